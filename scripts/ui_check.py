#!/usr/bin/env python
"""Browser check of what a user sees of splade-obs runs in the MLflow 3 UI.

1. Makes a store by two real short runs of ``splade-obs train`` (splade-tiny on CPU) in a work folder: run A
   with a BEIR eval folder and ``--save-best-metric ndcg@10``, run B shorter (for the compare page).
2. Serves it with a real ``mlflow ui`` (= ``mlflow server``) on 127.0.0.1 at a free port, started from the
   command that ``ui.ui_hint`` prints.
3. Opens, in headless Chromium (Playwright over the DevTools protocol, driving the system's Chromium), the
   experiment page, the run page's tabs, the Models tab, one trace and the compare page, every link made by
   ``splade_obs.sinks.mlflow.ui`` (so the check proves those links), and asserts on the rendered DOM text,
   one named check at a time; a screenshot of each page and ``report.json`` go under ``--out``
   (default ``outputs/ui-check/``).

Checks marked with a feature (``needs``) depend on work that may not have landed yet: while their feature is
in :data:`PENDING_FEATURES` a failure is reported but does not fail the check as a whole (``--strict``: it
does). Exit status: 0 when every required check passed, 1 otherwise, 2 when no browser could be started.

Usage: ``scripts/ui_check.sh [--workdir DIR] [--out DIR] [--steps N] [--strict] [--serve]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from splade_obs.sinks.mlflow import ui  # noqa: E402
from tests._eval_utils import write_beir  # noqa: E402
from tests._mlflow_utils import _wait_healthy, free_port, stop_server  # noqa: E402

#: Features other engineers are adding now; checks that need them only warn while they are listed here.
PENDING_FEATURES: frozenset[str] = frozenset()  # every feature the checks need has landed: all are required
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WAIT_MS = 25_000
#: localStorage set before each page: keeps the MLflow Assistant panel from opening over the page on first
#: load. The workflow type (``ui.WORKFLOW_STORAGE_KEY``) is deliberately NOT set: the links must do it alone.
INIT_STORAGE = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true"}
#: Every check, in the order run: (name, feature it needs or None, informational).
CHECKS = (("plain-experiment-link", None, True), ("experiment-opens-on-runs", None, False),
          ("run-page-name", None, False), ("train-loss-chart", None, False),
          ("system-metrics-count", "system-metrics", False), ("run-traces-row", "traces", False),
          ("trace-page", "traces", False), ("artifacts", None, False), ("logged-model", "logged-models", False),
          ("compare-runs", None, False))


@dataclass
class Check:
    """One named assertion on a rendered page."""
    name: str
    ok: bool = False
    detail: str = ""
    url: str = ""
    needs: str | None = None  # the feature of the parallel work it depends on
    info: bool = False  # an observation, never a failure
    screenshot: str | None = None
    seconds: float = 0.0

    def required(self, strict: bool = False) -> bool:
        return not self.info and (strict or self.needs not in PENDING_FEATURES)

    def status(self, strict: bool = False) -> str:
        if self.info or self.ok:
            return "INFO" if self.info else "PASS"
        return "FAIL" if self.required(strict) else f"FAIL (pending: {self.needs})"


@dataclass
class RunRef:
    name: str
    run_id: str


@dataclass
class Store:
    tracking_uri: str
    experiment_id: str
    runs: list[RunRef]
    trace_ids: list[str] = field(default_factory=list)
    logged_models: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # how long each stage took


@dataclass
class Report:
    base_url: str
    store: dict[str, Any]
    checks: list[Check]
    strict: bool = False

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.required(self.strict)]

    @property
    def pending_failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and not c.info and not c.required(self.strict)]

    def lines(self) -> list[str]:
        return [f"{c.status(self.strict):<30} {c.name:<26} {c.detail}" for c in self.checks]

    def to_json(self) -> str:
        return json.dumps({"base_url": self.base_url, "store": self.store, "strict": self.strict,
                           "checks": [asdict(c) | {"status": c.status(self.strict)} for c in self.checks]},
                          indent=2, default=str)


def find_chromium() -> str | None:
    """``$UI_CHECK_CHROMIUM``, else the first Chromium/Chrome on PATH (None when there is none)."""
    env = os.environ.get("UI_CHECK_CHROMIUM")
    if env:
        return env if Path(env).exists() else shutil.which(env)
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def browser_missing_reason() -> str | None:
    """Why the check cannot run here (None when it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install 'playwright>=1.50')"
    if find_chromium() is None:
        return "no Chromium found (apt-get install chromium, or set UI_CHECK_CHROMIUM)"
    return None


def _train(workdir: Path, uri: str, run_name: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(workdir / f"{run_name}.log", "wb")
    cmd = [sys.executable, "-m", "splade_obs_cli.main", "train", "--tracking-uri", uri, "--run-name", run_name,
           "--progress", "none", "--output-dir", str(workdir / run_name), *args]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log_file = log  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, workdir: Path, run_name: str, timeout: float = 600) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        proc.log_file.close()  # type: ignore[attr-defined]
    if rc != 0:
        tail = (workdir / f"{run_name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"splade-obs train ({run_name}) exited {rc}:\n{tail}")


def _describe(uri: str, names: list[str]) -> Store:
    """Look the runs up in the store: ids, experiment, traces and logged models of run A."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    refs = []
    for name in names:
        found = client.search_runs(experiments, filter_string=f"attributes.run_name = '{name}'", max_results=1)
        if not found:
            raise RuntimeError(f"run {name} is not in {uri}")
        refs.append(RunRef(name, found[0].info.run_id))
    exp_id = client.get_run(refs[0].run_id).info.experiment_id
    store = Store(uri, exp_id, refs)
    with contextlib.suppress(Exception):  # traces in the store are parallel work: none is fine here
        traces = client.search_traces(locations=[exp_id], run_id=refs[0].run_id, max_results=50)
        traces = traces or client.search_traces(locations=[exp_id], max_results=50)
        store.trace_ids = [t.info.trace_id for t in traces]
    with contextlib.suppress(Exception):  # MLflow 3 logged models: parallel work too
        models = client.search_logged_models(experiment_ids=[exp_id], max_results=50)
        store.logged_models = [m.name for m in models if m.source_run_id == refs[0].run_id]
    return store


def make_store(workdir: Path, steps: int = 12, extra_args: tuple[str, ...] = (),
               on_server: Callable[[], Any] | None = None) -> tuple[Store, Any]:
    """Two real runs into ``<workdir>/mlruns/mlflow.db``, trained at the same time (the store is created under
    its lock by whichever comes first). ``on_server`` (when given) is called once run A is done, while run B
    may still be finishing, and its result is handed back (the server starts meanwhile)."""
    workdir.mkdir(parents=True, exist_ok=True)
    beir = write_beir(workdir / "beir")
    uri = f"sqlite:///{(workdir / 'mlruns' / 'mlflow.db').resolve()}"
    stamp = time.strftime("%H%M%S")
    name_a, name_b = f"uicheck-{stamp}-a", f"uicheck-{stamp}-b"
    eval_every = str(max(1, steps // 2))
    t0 = time.monotonic()
    a = _train(workdir, uri, name_a, ["--max-steps", str(steps), "--eval-data", str(beir), "--eval-steps",
                                      eval_every, "--save-best-metric", "ndcg@10", *extra_args])
    b = _train(workdir, uri, name_b, ["--max-steps", str(max(2, steps // 3)), "--no-log-model", *extra_args])
    seconds: dict[str, float] = {}
    try:
        _finish(a, workdir, name_a)
        seconds["run_a"] = time.monotonic() - t0
        served = on_server() if on_server else None
        seconds["server_up"] = time.monotonic() - t0
    finally:
        if b.poll() is None and sys.exc_info()[0] is not None:
            b.kill()
        _finish(b, workdir, name_b)
    seconds["run_b"] = time.monotonic() - t0
    store = _describe(uri, [name_a, name_b])
    store.seconds = {k: round(v, 1) for k, v in seconds.items()}
    return store, served


@contextlib.contextmanager
def serve(tracking_uri: str, workdir: Path, port: int = 0, wait_s: float = 120.0) -> Iterator[str]:
    """A real ``mlflow ui`` (an alias of ``mlflow server``) for the store on 127.0.0.1, started with the command
    of :func:`ui.local_ui_command` (so the console hint is proved too); its GenAI job runner is off (not needed
    to view runs; it forks eight ~240 MB processes)."""
    port = port or free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = workdir / "mlflow-server.log"
    with open(log_path, "wb") as log:
        # the command ui.ui_hint prints for the store (mlflow ui = mlflow server), with one worker
        argv = shlex.split(ui.local_ui_command(tracking_uri, port))
        argv[0] = str(Path(sys.executable).parent / "mlflow")
        proc = subprocess.Popen([*argv, "--host", "127.0.0.1", "--workers", "1"], cwd=workdir, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", proc, wait_s, log_path)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_server(proc)


class Pages:
    """Opens pages in one headless Chromium context and runs named checks on them."""

    def __init__(self, page: Any, base: str, store: Store, out: Path) -> None:
        self.page, self.base, self.store, self.out = page, base, store, out
        self.checks: list[Check] = []
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)[:300]))

    def text(self) -> str:
        return self.page.inner_text("body")

    def wait_text(self, *needles: str, timeout: int = WAIT_MS) -> str:
        """Wait until the page shows every needle; return the page text (AssertionError naming the missing)."""
        try:
            self.page.wait_for_function("ns => ns.every(n => document.body.innerText.includes(n))",
                                        arg=list(needles), timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - playwright's TimeoutError
            text = self.text()
            missing = [n for n in needles if n not in text]
            raise AssertionError(f"not shown after {timeout / 1000:g}s: {missing}") from exc
        return self.text()

    def run(self, name: str, url: str, body: Callable[[], str]) -> Check:
        """Open ``url``, run ``body`` (returns the detail, raises on failure), screenshot, record."""
        needs, info = next((n, i) for c, n, i in CHECKS if c == name)
        check = Check(name=name, url=url, needs=needs, info=info)
        start = time.monotonic()
        try:
            self.page.goto("about:blank")  # a fresh load of each link, as when a user opens it
            self.page.goto(url, wait_until="domcontentloaded")
            check.detail = body()
            check.ok = True
        except Exception as exc:  # noqa: BLE001 - a failed check is reported, the others still run
            check.detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        shot = self.out / f"{len(self.checks) + 1:02d}-{name}.png"
        with contextlib.suppress(Exception):
            self.page.screenshot(path=str(shot))
            check.screenshot = str(shot)
        check.seconds = round(time.monotonic() - start, 2)
        self.checks.append(check)
        return check

    def all(self) -> list[Check]:
        s, base = self.store, self.base
        a, b, eid = s.runs[0], s.runs[1], s.experiment_id
        self.run("plain-experiment-link", f"{base}/#/experiments/{eid}", self._plain_link)
        self.run("experiment-opens-on-runs", ui.experiment_url(base, eid), self._experiment)
        self.run("run-page-name", ui.run_url(base, eid, a.run_id), self._run_overview)
        self.run("train-loss-chart", ui.run_url(base, eid, a.run_id, "model-metrics"), self._loss_chart)
        self.run("system-metrics-count", ui.run_url(base, eid, a.run_id, "system-metrics"),
                 self._system_metrics)
        self.run("run-traces-row", ui.run_url(base, eid, a.run_id, "traces"), self._traces_row)
        trace = s.trace_ids[0] if s.trace_ids else "tr-none"
        self.run("trace-page", ui.trace_url(base, eid, trace), lambda: self._trace_page(trace))
        self.run("artifacts", ui.run_url(base, eid, a.run_id, "artifacts/config.yaml"), self._artifacts)
        self.run("logged-model", ui.models_url(base, eid), self._logged_model)
        self.run("compare-runs", ui.compare_url(base, [eid], [a.run_id, b.run_id]), self._compare)
        stored = None
        with contextlib.suppress(Exception):
            stored = self.page.evaluate(f"localStorage.getItem({json.dumps(ui.WORKFLOW_STORAGE_KEY)})")
        if stored is not None:  # the links alone must open the runs views: nothing may have set it
            self.checks[1].ok = False
            self.checks[1].detail += f" (but localStorage {ui.WORKFLOW_STORAGE_KEY}={stored} was set)"
        return self.checks

    def _plain_link(self) -> str:
        self.page.wait_for_function("n => /Observability|matching run/.test(document.body.innerText)",
                                    arg=None, timeout=WAIT_MS)
        where = "the GenAI Overview" if "Observability" in self.text() else "the runs table"
        return f"#/experiments/<id> without workflowType opens on {where}"

    def _experiment(self) -> str:
        a, b = self.store.runs[0].name, self.store.runs[1].name
        txt = self.wait_text(a, b, "matching run")
        assert "Observability" not in txt, "the sidebar shows the GenAI navigation"
        assert "Model registry" in txt, "the sidebar lacks the Model training navigation"
        assert "/runs" in self.page.url, f"left the runs view for {self.page.url}"
        return f"runs table lists {a} and {b}"

    def _run_overview(self) -> str:
        a = self.store.runs[0].name
        txt = self.wait_text(a, "Overview", "Metrics (")
        assert "train/loss" in txt, "train/loss is not in the run's metrics table"
        assert "FINISHED" in txt or "Finished" in txt, "the run does not show as finished"
        return f"{a}: name, Metrics table with train/loss"

    def _loss_chart(self) -> str:
        self.page.get_by_placeholder("Search metric charts").fill("train/loss")
        legend = f"{self.store.runs[0].name} (train/loss)"
        self.wait_text(legend)
        self.page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot path.point').length > 1",
                                    timeout=WAIT_MS)
        points = self.page.locator(".js-plotly-plot path.point").count()
        return f"chart '{legend}' drawn with {points} points"

    def _system_metrics(self) -> str:
        with contextlib.suppress(Exception):  # the section's count, once the metrics are loaded
            self.page.wait_for_function("() => +(/System metrics\\s*\\((\\d+)\\)/.exec(document.body.innerText)"
                                        " || [0, 0])[1] > 0", timeout=WAIT_MS)
        m = re.search(r"System metrics\s*\((\d+)\)", self.text())
        count = int(m.group(1)) if m else 0
        assert count > 0, f"{m.group(0) if m else 'no System metrics section'}: no system/* metrics in the run"
        want = min(count, 3)  # the charts in view are drawn; the others wait until scrolled to
        self.page.wait_for_function("n => document.querySelectorAll('.js-plotly-plot').length >= n", arg=want,
                                    timeout=WAIT_MS)
        return f"System metrics ({count}), the first {want} charts drawn"

    def _traces_row(self) -> str:
        self.page.wait_for_function("() => /tr-[0-9a-f]{32}/.test(document.body.innerText)", timeout=WAIT_MS)
        return f"trace row {re.search(r'tr-[0-9a-f]{32}', self.text()).group(0)}"

    def _trace_page(self, trace_id: str) -> str:
        assert self.store.trace_ids, "no MLflow trace of the run in the store"
        short = trace_id.removeprefix("tr-")[:8]
        self.wait_text("Spans", short)
        return f"trace {trace_id} opens with its spans"

    def _artifacts(self) -> str:
        txt = self.wait_text("config.yaml", "splade-tiny")
        folders = [f for f in ("logs", "model", "plots") if f in txt]
        assert "model" in folders, "no model folder among the artifacts"
        return f"artifacts listed ({', '.join(folders)}, config.yaml), config.yaml previews"

    def _logged_model(self) -> str:
        assert self.store.logged_models, "no MLflow 3 LoggedModel from the run in the store"
        name = self.store.logged_models[0]
        self.wait_text(name, self.store.runs[0].name)
        return f"logged model {name} from {self.store.runs[0].name}"

    def _compare(self) -> str:
        a, b = self.store.runs[0].name, self.store.runs[1].name
        txt = self.wait_text("Comparing 2 Runs", a, b, "Metrics")
        # the metrics table renders only its first rows: epoch/loss (both runs log it) is among them
        assert "epoch/loss" in txt, "epoch/loss is not among the compared metrics"
        assert "Model registry" in txt, "the sidebar lacks the Model training navigation"
        return f"compare page of {a} and {b} with their metrics"


def browse(base: str, store: Store, out: Path, chromium: str) -> tuple[list[Check], list[str]]:
    from playwright.sync_api import sync_playwright
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            ctx = browser.new_context(viewport={"width": 1400, "height": 900})
            ctx.add_init_script(f"(() => {{ const s = {json.dumps(INIT_STORAGE)}; for (const k in s) "
                                "if (localStorage.getItem(k) === null) localStorage.setItem(k, s[k]); })()")
            pages = Pages(ctx.new_page(), base, store, out)
            return pages.all(), pages.errors
        finally:
            browser.close()


def run_check(workdir: Path, out: Path, steps: int = 12, strict: bool = False, port: int = 0,
              extra_args: tuple[str, ...] = (), serve_forever: bool = False) -> Report:
    """The whole check: store, server, browser. Raises when no browser can be started."""
    if (reason := browser_missing_reason()) is not None:
        raise RuntimeError(reason)
    chromium = find_chromium()
    with contextlib.ExitStack() as stack:
        uri = f"sqlite:///{(workdir / 'mlruns' / 'mlflow.db').resolve()}"
        store, base = make_store(workdir, steps, extra_args,
                                 on_server=lambda: stack.enter_context(serve(uri, workdir, port)))
        t0 = time.monotonic()
        checks, errors = browse(base, store, out, chromium)
        store.seconds["browser"] = round(time.monotonic() - t0, 1)
        report = Report(base_url=base, strict=strict, checks=checks,
                        store={"workdir": str(workdir), "tracking_uri": uri, "experiment_id": store.experiment_id,
                               "runs": [asdict(r) for r in store.runs], "trace_ids": store.trace_ids[:5],
                               "logged_models": store.logged_models, "page_errors": errors[:20],
                               "seconds": store.seconds,
                               "ui_hint": ui.ui_hint(uri, store.experiment_id, store.runs[0].run_id)})
        (out / "report.json").write_text(report.to_json())
        if serve_forever:
            print("\n".join(report.lines()), flush=True)
            print(f"serving {ui.experiment_url(base, store.experiment_id)} (Ctrl-C to stop)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, help="where the runs and their store go (default: a temp folder)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "ui-check", help="screenshots and report.json")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of run A (run B: a third)")
    p.add_argument("--port", type=int, default=0, help="mlflow server port (default: a free one)")
    p.add_argument("--strict", action="store_true", help="checks of pending features count as required")
    p.add_argument("--serve", action="store_true", help="keep serving the store after the checks")
    p.add_argument("--train-arg", action="append", default=[], help="extra argument to splade-obs train")
    a = p.parse_args(argv)
    if (reason := browser_missing_reason()) is not None:
        print(f"ui-check: cannot run: {reason}", file=sys.stderr)
        return 2
    tmp = None if a.workdir else tempfile.mkdtemp(prefix="splade-ui-check-")
    workdir = (a.workdir or Path(tmp)).resolve()
    try:
        t0 = time.monotonic()
        report = run_check(workdir, a.out.resolve(), a.steps, a.strict, a.port, tuple(a.train_arg), a.serve)
        print("\n".join(report.lines()))
        print(f"ui-check: {len(report.checks) - len(report.failed)} of {len(report.checks)} checks fine, "
              f"{len(report.failed)} failed, {len(report.pending_failed)} pending; screenshots in {a.out} "
              f"({time.monotonic() - t0:.0f}s)")
        return 1 if report.failed else 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
