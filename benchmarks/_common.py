"""The preamble every benchmark script shares: ``from _common import ...`` is each script's first import.

The scripts run as ``python benchmarks/NAME.py``, so Python puts benchmarks/ first on ``sys.path`` and this
file imports as ``_common``. Importing it

* puts the repository root on ``sys.path``, so ``splade_obs`` and the CLI import from this checkout even
  where the project is not installed;
* sets ``MLFLOW_DISABLE_TELEMETRY=true`` unless the environment already says otherwise (a timing run sends
  no usage pings). Thread counts are left to the caller (``OMP_NUM_THREADS=2 python benchmarks/...``), so
  the numbers are measured under the settings the command line shows.

It also holds what the scripts share: the paths (``ROOT``, ``RESULTS``, ``CONFIGS``, ``DEFAULT_DATA``), the
retrieval metrics ``KEYS``, :func:`machine`, :func:`require_beir`, :func:`run_cli`, :func:`table` (their
side-by-side text tables), :func:`write_json` (their results files, written atomically) and
:func:`run_measured` (a command's wall time, CPU time and peak RSS, its whole process tree counted).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "benchmarks" / "configs"
#: SciFact as a BEIR folder, beside the repository (see ../shared/data/scifact/SOURCE.md).
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "scifact"
#: The retrieval metrics every SciFact table shows, in order.
KEYS = ("ndcg@10", "mrr@10", "recall@100", "map@100")
#: The CLI's module, for ``python -m``: the scripts run every command as a user would.
CLI_MODULE = "splade_obs_cli.main"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version and load: what a reader needs to judge the numbers."""
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "load_avg": list(os.getloadavg())}


def require_beir(data: Path) -> None:
    """Exit with a message naming ``data`` unless it is a BEIR folder (it has a ``corpus.jsonl``)."""
    if not (data / "corpus.jsonl").is_file():
        raise SystemExit(f"SciFact not found at {data} (a BEIR folder: corpus.jsonl, queries.jsonl, qrels/; "
                         "see ../shared/data/scifact/SOURCE.md)")


def run_cli(*args: str) -> None:
    """``splade-obs ARGS...`` in a fresh interpreter from the repository root; a failing command raises."""
    subprocess.run([sys.executable, "-m", CLI_MODULE, *args], check=True, cwd=ROOT)


def table(columns: Sequence[tuple[str, ...]], rows: Iterable[Sequence[Any]], *, sep: str = "",
          rule: bool = False) -> str:
    """A fixed-width text table, the scripts' side-by-side comparisons.

    Each column is ``(title, align_width)`` or ``(title, align_width, number_format)``: ``("metric", "<30")``,
    ``("fused", ">14", ".2f")``. A cell that is a string is placed as it is (callers format mixed cells such
    as ``"1.23x"`` or ``"-"``); any other cell is formatted with its column's number format first. ``sep`` goes
    between columns; ``rule`` puts a line of dashes under the header.
    """
    def line(cells: Sequence[Any]) -> str:
        out = []
        for cell, (_, spec, *fmt) in zip(cells, columns, strict=True):
            text = cell if isinstance(cell, str) else format(cell, fmt[0] if fmt else "")
            out.append(f"{text:{spec}}")
        return sep.join(out)

    head = line([c[0] for c in columns])
    return "\n".join([head, *(["-" * len(head)] if rule else []), *(line(r) for r in rows)])


def write_json(path: Path, obj: Any, indent: int = 2) -> Path:
    """Write a results file atomically (a crash mid-write keeps the previous results), parent created."""
    from splade_obs.atomic import atomic_write_text

    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def _tree_rss(proc: Any) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
                 ) -> tuple[float, float, float]:
    """Run ``cmd``; (wall seconds, CPU seconds of the whole process tree, its peak RSS in MB). A failure raises
    with the log. CPU seconds (user + system of every waited-for descendant) hardly move with other load on the
    machine, wall seconds do: both are reported."""
    import resource

    import psutil

    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd or ROOT)
        watched, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss(watched))
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return wall, (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime), peak / 2**20
