"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this imports as ``_common``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


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
