"""A small HTTP fault proxy for the tests: put it in front of a real ``mlflow server`` and switch what the
"server" does, mid-run, from the test.

API (stable: other tests and benchmarks use it)::

    with FaultProxy(upstream_url) as proxy:          # listens on 127.0.0.1, a free port
        proxy.url                                     # "http://127.0.0.1:PORT": give this to the client
        proxy.set_mode("pass")                        # forward every request (the default)
        proxy.set_mode("status", code=503)            # answer every request with that status (500, 503, 429, 404...)
        proxy.set_mode("hang")                        # accept, read the request, never answer (until the mode
                                                      #   changes or the proxy stops; then the connection is closed
                                                      #   without an answer and the request is NOT forwarded)
        proxy.set_mode("close")                       # read the request, close the connection without an answer
        proxy.set_mode("refuse")                      # stop listening: connections are refused; any other mode
                                                      #   listens again on the same port
        proxy.set_mode("status", code=500, paths="log-batch")   # fault only requests whose path contains
                                                      #   "log-batch"; the others are forwarded
        proxy.mode, proxy.code                        # the current mode and status code
        proxy.requests                                # requests received (all modes, refused ones excluded)
        proxy.forwarded                               # requests forwarded to the upstream and answered
        proxy.faulted                                 # requests given a fault (status / hang / close)
        proxy.log                                     # [(method, path, what)] for every request, what = the
                                                      #   status code answered, or "hang" / "close"
        proxy.wait_for(lambda p: p.faulted >= 3, timeout=10)   # poll until true (False on timeout)

``FaultProxy(upstream_url).start()`` / ``.stop()`` do the same as the ``with`` block. When the upstream
itself is down, a forwarded request is answered 502 (like a gateway). Status answers carry a short
plain-text body (``body=`` in ``set_mode`` replaces it), like a load balancer's error page.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

MODES = ("pass", "status", "hang", "close", "refuse")
_HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                "transfer-encoding", "upgrade", "content-length", "host"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of ``upstream_url`` whose answers the test controls."""

    def __init__(self, upstream_url: str, *, port: int = 0, upstream_timeout: float = 60.0) -> None:
        parts = urllib.parse.urlsplit(upstream_url)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.upstream_timeout = upstream_timeout
        self.mode = "pass"
        self.code = 503
        self.paths: str | None = None
        self.body: bytes | None = None
        self.requests = 0
        self.forwarded = 0
        self.faulted = 0
        self.log: list[tuple[str, str, Any]] = []
        self._port = port
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopped = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> "FaultProxy":
        self._listen()
        return self

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        self._unlisten()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _listen(self) -> None:
        if self._server is not None:
            return
        server = _Server(("127.0.0.1", self._port), self._handler_class())
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fault-proxy-{self._port}", daemon=True)
        self._thread.start()

    def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ------------------------------------------------------------------------------------------ modes
    def set_mode(self, mode: str, code: int = 503, *, paths: str | None = None, body: str | None = None) -> None:
        """Switch what the proxy does with the next requests (and releases requests held by ``hang``)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        with self._changed:
            self.mode, self.code, self.paths = mode, int(code), paths
            self.body = body.encode() if body is not None else None
            self._changed.notify_all()
        if mode == "refuse":
            self._unlisten()
        elif not self._stopped:
            self._listen()

    def wait_for(self, predicate: Callable[["FaultProxy"], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.05)
        return predicate(self)

    # ---------------------------------------------------------------------------------------- handler
    def _decide(self, path: str) -> tuple[str, int, bytes | None]:
        with self._lock:
            self.requests += 1
            if self.mode == "pass" or (self.paths is not None and self.paths not in path):
                return "pass", 0, None
            self.faulted += 1
            return self.mode, self.code, self.body

    def _record(self, method: str, path: str, what: Any) -> None:
        with self._lock:
            self.log.append((method, path, what))

    def _hold(self, mode_seen: str) -> None:
        """Block a hung request until the mode changes or the proxy stops."""
        with self._changed:
            while not self._stopped and self.mode == mode_seen:
                self._changed.wait(0.5)

    def _forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
                 ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=self.upstream_timeout)
        try:
            out = {k: v for k, v in headers if k.lower() not in _HOP_HEADERS}
            out["Host"] = f"{self.upstream_host}:{self.upstream_port}"
            out["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=out)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, [(k, v) for k, v in resp.getheaders()
                                              if k.lower() not in _HOP_HEADERS], data
        finally:
            conn.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _answer(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status, reason)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _handle(self) -> None:
                body = self._body()
                what, code, fault_body = proxy._decide(self.path)
                if what == "pass" or what == "refuse":  # refuse: a request that got in before the listener closed
                    try:
                        status, reason, headers, data = proxy._forward(self.command, self.path,
                                                                       list(self.headers.items()), body)
                    except OSError as exc:
                        status, reason, headers = 502, "Bad Gateway", [("Content-Type", "text/plain")]
                        data = f"502 Bad Gateway (fault proxy: upstream unreachable: {exc})".encode()
                    else:
                        with proxy._lock:
                            proxy.forwarded += 1
                    proxy._record(self.command, self.path, status)
                    self._answer(status, reason, headers, data)
                elif what == "status":
                    reason = http.client.responses.get(code, "Fault")
                    data = fault_body if fault_body is not None else f"{code} {reason} (fault proxy)".encode()
                    proxy._record(self.command, self.path, code)
                    self._answer(code, reason, [("Content-Type", "text/plain")], data)
                elif what == "hang":
                    proxy._record(self.command, self.path, "hang")
                    proxy._hold("hang")
                    self._drop()
                else:  # close
                    proxy._record(self.command, self.path, "close")
                    self._drop()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle  # noqa: N815

        return Handler
