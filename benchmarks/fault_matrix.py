"""The MLflow fault matrix: `splade-obs train` against a real `mlflow server` behind a fault proxy, one row per
fault, counting every metric point: in the store, in the unsent file, lost; then `splade-obs runs sync`.

A real ``mlflow server`` (sqlite backend) runs on 127.0.0.1 behind ``tests/_fault_proxy.FaultProxy``. Each row
trains splade-tiny with tiny settings as a user would (``python -m splade_obs_cli.main train ...`` in a
subprocess, ``--tracking-uri`` the proxy, its own experiment), while the script switches what the proxy does:

====================  =================================================================================
none                  every request forwarded (the reference: its store holds every point produced)
503 window            HTTP 503 from the first step for ``--window`` seconds (and at least ``--min-faulted``
                      requests), then forwarded again
500 to the end        HTTP 500 from the first step until the process has exited
429 window            HTTP 429, the same window
hang, recover         requests held without an answer from the first step for ``--hang`` seconds (and at
                      least one request), then released (closed unanswered) and forwarded
hang at the end       requests held from the end of training (``Run finished``) until the process exits
connection close      connections closed without an answer, the same window as 503
server killed         the trainer talks to the server directly, killed (SIGKILL) at the first step:
                      connections refused until the process exits; restarted on the same port and store
                      before ``runs sync``
SIGTERM, hung end     requests held from the end of training, SIGTERM to the trainer 2 s later
====================  =================================================================================

"The first step" is the moment the trainer's log file shows ``Step 1/``; "the end of training" the moment it
shows ``Run finished``. Points produced = the reference run's points per metric key (the settings are the
same, so every run produces the same points per key). For a row: points in the store (the run's history of
every key, read from the server's sqlite backend) + points in ``mlflow_unsent.jsonl`` not already in the store;
lost = the sum over keys of what is missing against the reference. Then ``splade-obs runs sync LOG_DIR`` (when
there is an unsent file, or the run was left RUNNING) and the store is counted again: lost after sync; a
second sync must send nothing. "seconds to exit" is from the end of training (for the SIGTERM row: from the
signal) to the process's exit; the whole wall time is in the JSON.

    python benchmarks/fault_matrix.py                      # every row, about 3-5 minutes on 2 cores
    python benchmarks/fault_matrix.py --faults none,503_window

Prints the table and writes benchmarks/results/fault_matrix.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

# the benchmarks' shared preamble (repository root on sys.path, paths, table printer, results writer)
from _common import CLI_MODULE, RESULTS, ROOT, machine, table, write_json

RESULTS_FILE = RESULTS / "fault_matrix.json"
UNSENT = "mlflow_unsent.jsonl"
TINY = ["--batch-size", "4", "--max-query-length", "16", "--max-doc-length", "32", "--otel-exporter", "none",
        "--progress", "none", "--log-every-steps", "1"]

#: name -> the label in the table (what each does: the module doc)
FAULTS: dict[str, str] = {
    "none": "none",
    "503_window": "503 window mid-run",
    "500_to_end": "500 from mid-run on",
    "429_window": "429 window mid-run",
    "hang_recover": "hang mid-run, recover",
    "hang_at_end": "hang at the end",
    "close_window": "connection close mid-run",
    "server_killed": "server killed mid-run",
    "sigterm_hung_end": "SIGTERM during hung end",
}


# ------------------------------------------------------------------------------------------- server
class Server:
    """``mlflow server`` on a fixed 127.0.0.1 port with a sqlite backend; can be killed and started again."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.db = folder / "server.db"
        self.art = folder / "server-artifacts"
        self.art.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, wait_s: float = 120.0) -> None:
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.db}", "--default-artifact-root",
             self.art.as_uri()], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early; see {self.folder / 'server.log'}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server not healthy after {wait_s}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ counting
def _client(server: Server) -> Any:
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=f"sqlite:///{server.db}")


def find_run(server: Server, experiment: str) -> Any:
    client = _client(server)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    if len(runs) != 1:
        raise RuntimeError(f"expected one run in experiment {experiment}, found {len(runs)}")
    return runs[0]


def store_points(server: Server, run_id: str, keys: set[str]) -> set[tuple[Any, ...]]:
    from splade_obs.sinks.mlflow.sync import value_key

    client = _client(server)
    keys = keys | set(client.get_run(run_id).data.metrics)
    return {(m.key, m.step, m.timestamp, value_key(m.value)) for k in sorted(keys)
            for m in client.get_metric_history(run_id, k)}


def file_points(log_dir: Path) -> set[tuple[Any, ...]]:
    from splade_obs.sinks.mlflow.sync import read_unsent

    path = log_dir / UNSENT
    if not path.exists():
        return set()
    return {p.ident() for r in read_unsent(path).runs.values() for p in r.points}


def lost_against(reference: Counter, points: set[tuple[Any, ...]]) -> tuple[int, int]:
    """(points missing against the reference, per key; points beyond it: duplicates would show here)."""
    got = Counter(p[0] for p in points)
    missing = sum(max(0, n - got[k]) for k, n in reference.items())
    extra = sum(max(0, n - reference[k]) for k, n in got.items())
    return missing, extra


# ---------------------------------------------------------------------------------------------- runs
def wait_for_line(log_file: Path, text: str, proc: subprocess.Popen, timeout: float = 300.0) -> float | None:
    """Poll the trainer's log file until ``text`` appears; the monotonic time it was seen, None if it exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in log_file.read_text(errors="replace"):
                return time.monotonic()
        except OSError:
            pass
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    return None


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", CLI_MODULE, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def train(fault: str, folder: Path, proxy: Any, server: Server, args: argparse.Namespace) -> dict[str, Any]:
    out = folder / "out"
    log_dir = out / "logs"
    experiment = f"fault-matrix-{fault}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # a killed server is reached directly (connections refused, as for a real dead server); the proxy would
    # answer 502 on the connections it keeps alive
    uri = server.url if fault == "server_killed" else proxy.url
    cmd = [sys.executable, "-m", CLI_MODULE, "train", "--output-dir", str(out), "--tracking-uri", uri,
           "--experiment-name", experiment, "--max-steps", str(args.max_steps), *TINY]
    proxy.set_mode("pass")
    faulted_before = proxy.faulted
    t0 = time.monotonic()
    with open(folder / "train.out", "w") as console:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=console, stderr=subprocess.STDOUT)
    log_file = log_dir / "train_splade.log"
    at_step1 = wait_for_line(log_file, "Step 1/", proc)
    if at_step1 is not None:
        _mid_run(fault, proxy, server, args)
    finished_at = wait_for_line(log_file, "Run finished", proc) if at_step1 is not None else None
    if finished_at is not None and fault in ("hang_at_end", "sigterm_hung_end"):
        proxy.set_mode("hang")
    from_time = finished_at
    if fault == "sigterm_hung_end" and finished_at is not None:
        time.sleep(2.0)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            from_time = time.monotonic()
    try:
        rc = proc.wait(timeout=args.exit_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    exited = time.monotonic()
    if fault == "server_killed":
        server.start()  # same port, same store: a restarted server
    proxy.set_mode("pass")
    return {"exit_code": rc, "wall_seconds": round(exited - t0, 2), "requests_faulted": proxy.faulted - faulted_before,
            "seconds_to_exit": round(exited - from_time, 2) if from_time is not None else None,
            "experiment": experiment, "log_dir": log_dir}


def _mid_run(fault: str, proxy: Any, server: Server, args: argparse.Namespace) -> None:
    """Start the fault at the first step. A window ends on a watcher thread once it has lasted its seconds
    and faulted at least ``--min-faulted`` requests (one for a hang; so it always hits the run), or after
    ``--window-max``."""
    import threading

    def window(mode: str, seconds: float, min_faulted: int, **kw: Any) -> None:
        start, faulted = time.monotonic(), proxy.faulted
        proxy.set_mode(mode, **kw)

        def watch() -> None:
            while True:
                elapsed = time.monotonic() - start
                if (elapsed >= seconds and proxy.faulted - faulted >= min_faulted) or elapsed >= args.window_max:
                    proxy.set_mode("pass")
                    return
                time.sleep(0.05)

        threading.Thread(target=watch, daemon=True).start()

    if fault == "503_window":
        window("status", args.window, args.min_faulted, code=503)
    elif fault == "500_to_end":
        proxy.set_mode("status", code=500)
    elif fault == "429_window":
        window("status", args.window, args.min_faulted, code=429)
    elif fault == "hang_recover":
        window("hang", args.hang, 1)  # a hung request holds its sender: one is all a hang can fault
    elif fault == "close_window":
        window("close", args.window, args.min_faulted)
    elif fault == "server_killed":
        server.kill()


def one_row(fault: str, base: Path, proxy: Any, server: Server, reference: Counter | None,
            args: argparse.Namespace) -> dict[str, Any]:
    folder = base / fault
    folder.mkdir(parents=True)
    run = train(fault, folder, proxy, server, args)
    log_dir: Path = run.pop("log_dir")
    found = find_run(server, run["experiment"])
    run_id = found.info.run_id
    metrics_doc = _json(log_dir / "training_metrics.json")
    survived = metrics_doc.get("status") == "FINISHED" and metrics_doc.get("last_step") == args.max_steps
    in_store, in_file = store_points(server, run_id, set(reference or ())), file_points(log_dir)
    row: dict[str, Any] = {"fault": fault, "label": FAULTS[fault], "run_id": run_id, **run, "survived": survived,
                           "trainer_status": metrics_doc.get("status"), "points_in_store": len(in_store),
                           "points_in_unsent_file": len(in_file), "points_in_both": len(in_store & in_file),
                           "status_before_sync": _client(server).get_run(run_id).info.status}
    if reference is None:  # the reference row: what it stored (and kept) is what every run produces
        reference = Counter(p[0] for p in in_store | in_file)
        row["reference_points"] = sum(reference.values())
    row["points_produced"] = sum(reference.values())
    row["points_lost"], row["points_extra"] = lost_against(reference, in_store | in_file)
    needs_sync = (log_dir / UNSENT).exists() or row["status_before_sync"] == "RUNNING"
    if needs_sync:
        first = cli("runs", "sync", str(log_dir), cwd=folder)
        second = cli("runs", "sync", str(log_dir), cwd=folder)
        row["sync"] = {"exit_code": first.returncode, "output": (first.stdout + first.stderr).strip().splitlines()}
        row["second_sync"] = {"exit_code": second.returncode,
                              "output": (second.stdout + second.stderr).strip().splitlines()}
    after = store_points(server, run_id, set(reference))
    row["points_lost_after_sync"], row["points_extra_after_sync"] = lost_against(reference, after)
    row["status_after_sync"] = _client(server).get_run(run_id).info.status
    row["reference"] = dict(reference) if fault == "none" else None
    return row


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, from: {', '.join(FAULTS)}")
    ap.add_argument("--max-steps", type=int, default=20, help="optimizer steps per run (tiny settings otherwise)")
    ap.add_argument("--window", type=float, default=2.5, help="seconds a 503 / 429 / close window lasts")
    ap.add_argument("--hang", type=float, default=4.0, help="seconds requests hang in 'hang, recover'")
    ap.add_argument("--min-faulted", type=int, default=2, help="requests a window must fault before it ends")
    ap.add_argument("--window-max", type=float, default=30.0, help="seconds after which a window ends anyway")
    ap.add_argument("--exit-timeout", type=float, default=180.0, help="seconds a run may take to exit after start")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (runs, stores, logs)")
    ap.add_argument("--output", type=Path, default=RESULTS_FILE)
    args = ap.parse_args()
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise SystemExit(f"unknown fault(s) {unknown}; choose from {', '.join(FAULTS)}")
    if faults[0] != "none":
        faults.insert(0, "none")  # the reference row comes first: it says how many points a run produces

    from tests._fault_proxy import FaultProxy

    base = Path(tempfile.mkdtemp(prefix="fault-matrix-"))
    server = Server(base, free_port())
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        server.start()
        with FaultProxy(server.url) as proxy:
            reference: Counter | None = None
            for fault in faults:
                print(f"... {fault}", file=sys.stderr, flush=True)
                row = one_row(fault, base, proxy, server, reference, args)
                if fault == "none":
                    reference = Counter(row["reference"])
                rows.append(row)
    finally:
        server.kill()
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)

    columns = [("fault", "<26"), ("survived", ">9"), ("points lost", ">12"), ("exit code", ">10"),
               ("seconds to exit", ">16"), ("lost after sync", ">16"), ("status after sync", ">18"),
               ("requests faulted", ">17")]
    print(table(columns, [[r["label"], "yes" if r["survived"] else "NO", str(r["points_lost"]), str(r["exit_code"]),
                           "-" if r["seconds_to_exit"] is None else f"{r['seconds_to_exit']:.1f}",
                           str(r["points_lost_after_sync"]), r["status_after_sync"],
                           "killed" if r["fault"] == "server_killed" else str(r["requests_faulted"])]
                          for r in rows], sep="  ", rule=True))
    produced = rows[0]["points_produced"] if rows else 0
    synced = [r for r in rows if "sync" in r]
    idle = [r for r in synced if r["second_sync"]["exit_code"] == 0
            and (r["second_sync"]["output"] or [""])[0].startswith("nothing to sync")]
    print(f"\npoints produced per run: {produced}; rows synced: {len(synced)} "
          f"({', '.join(r['fault'] for r in synced) or '-'}); second sync had nothing to do in {len(idle)} of them")
    command = "python benchmarks/fault_matrix.py " + " ".join(sys.argv[1:])
    write_json(args.output, {"date": dt.date.today().isoformat(), "command": command.strip(),
                             "machine": machine(), "settings": {"max_steps": args.max_steps, "tiny_flags": TINY,
                                                                "window_s": args.window, "hang_s": args.hang},
                             "total_seconds": round(time.monotonic() - started, 1), "rows": rows})
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    if any(r["points_lost_after_sync"] or r["points_extra_after_sync"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
