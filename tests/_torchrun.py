"""Launch ``splade-obs`` under real ``torchrun`` "nodes" on this machine (tests only).

Each node is its own ``python -m torch.distributed.run`` process, as on a cluster, with its output in
``<tmp>/node<N>.log``; its agent and workers (each worker in a session of its own) carry a marker variable, so
a test can kill one node with everything it started, even workers a dead agent left behind. The
rendezvous is bound to 127.0.0.1: ``c10d`` (``--rdzv-backend c10d --rdzv-endpoint``, what users run on real
nodes; torchrun then hands out the node ranks in the order the nodes join) or ``static``
(``--master-addr/--master-port``, node ranks as given).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

CLI = ["-m", "splade_obs_cli.main"]
#: the environment variable that marks every process of one node
MARKER = "SPLADE_OBS_TEST_NODE"


def torchrun_env(drop: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """This process's environment without a launcher's rank variables (and without ``drop``), on loopback."""
    gone = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", *drop}
    environ = {k: v for k, v in os.environ.items() if k not in gone}
    environ.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true",
                   PYTHONUNBUFFERED="1", **extra)
    return environ


def node_command(node: int, port: int, args: list[str], *, nnodes: int = 2, nproc: int = 1,
                 rdzv: str = "c10d") -> list[str]:
    """The command line of node ``node`` of ``nnodes`` (``nproc`` processes each) running ``splade-obs args``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
           "--node-rank", str(node), "--max-restarts", "0"]
    if rdzv == "static":
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"splade-{port}"]
    return [*cmd, *CLI, *args]


@contextlib.contextmanager
def nodes(tmp: Path, port: int, args: list, *, nnodes: int = 2, nproc: int = 1, rdzv: str = "c10d",
          env: dict[str, str] | None = None, tag: str = "") -> Iterator[list[subprocess.Popen]]:
    """Start ``nnodes`` torchrun nodes (``args``: the CLI arguments, or one list of them per node); every one
    still alive on exit is killed with its workers."""
    procs: list[subprocess.Popen] = []
    try:
        for node in range(nnodes):
            own = args[node] if isinstance(args[0], list) else args  # one list per node, or one for all
            marker = f"{os.getpid()}-{port}-{node}"
            with open(tmp / f"node{node}{tag}.log", "w") as out:
                proc = subprocess.Popen(node_command(node, port, own, nnodes=nnodes, nproc=nproc, rdzv=rdzv),
                                        cwd=tmp, env={**(env or torchrun_env()), MARKER: marker}, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            proc.node_marker = marker  # type: ignore[attr-defined]
            procs.append(proc)
        yield procs
    finally:
        for p in procs:
            kill_node(p)


def kill_node(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the whole node, as a machine failure ends it: torchrun's agent and every process that
    carries the node's marker (its workers, even orphaned ones); with SIGKILL, reap the agent."""
    import psutil

    marker = getattr(proc, "node_marker", None)
    targets = [proc.pid] if proc.poll() is None else []  # a reaped agent's pid may be another process's now
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid != proc.pid and marker is not None and p.environ().get(MARKER) == marker:
                targets.append(p.pid)
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    if sig == signal.SIGKILL:
        proc.wait()


def wait_nodes(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """The exit codes, once every node ended or ``timeout`` seconds passed (None: still running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    return [p.poll() for p in procs]


def node_logs(tmp: Path, tag: str = "", tail: int = 3000) -> str:
    """The end of every node's output, for an assertion message."""
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}"
                     for f in sorted(tmp.glob(f"node*{tag}.log")))


def run_nodes(tmp: Path, port: int, args: list, *, timeout: float = 300, **kw) -> list[int | None]:
    """Run the nodes to the end; their exit codes."""
    with nodes(tmp, port, args, **kw) as procs:
        return wait_nodes(procs, timeout)
