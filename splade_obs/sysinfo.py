"""What machine and software a run used: logged at start, saved as ``<log_dir>/system_info.json``.

Only named facts are collected; environment variables are never dumped (they hold tokens).
Package versions come from installed metadata, so mlflow and OpenTelemetry are not imported here.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json


def loaded_cuda() -> Any:
    """``torch.cuda`` when torch is imported already and sees a GPU, else None (never imports torch itself:
    the sinks and the health monitor ask this without pulling torch in)."""
    torch = sys.modules.get("torch")
    try:
        return torch.cuda if torch is not None and torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken CUDA setup is "no GPU" here
        return None

SYSTEM_INFO_FILE = "system_info.json"


def collect_system_info(mixed_precision: str | None = None, *, runtime: Any = None) -> dict[str, Any]:
    """A flat dict of JSON-safe facts about this process's machine, libraries and working copy.

    ``mixed_precision`` is recorded as is; a run passes its resolved :class:`~splade_obs.device.Runtime`
    instead, which records the AMP dtype it chose ("float32", "float16", "bfloat16") and its ``device``.
    """
    if runtime is not None:
        mixed_precision = runtime.amp_name
    info: dict[str, Any] = {
        "python_version": platform.python_version(),
        "python_executable": sys.executable,
        "os": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu": _cpu_name(),
        "cpu_count": _physical_cores(),
        "cpu_count_logical": os.cpu_count() or 0,
        "memory_total_gb": _memory_total_gb(),
    }
    info.update(_torch_info())
    info.update({
        "transformers_version": _version("transformers"),
        "mlflow_version": _version("mlflow"),
        "opentelemetry_version": _version("opentelemetry-sdk") or _version("opentelemetry-api"),
        "splade_obs_version": _version("splade-obs"),
        "mixed_precision": mixed_precision,
    })
    if runtime is not None:
        info["device"] = str(runtime.device)
    info.update(_git_info(Path.cwd()))
    return info


def save_system_info(info: dict[str, Any], log_dir: str | os.PathLike[str]) -> Path:
    """Write ``info`` to ``<log_dir>/system_info.json`` atomically and return the path."""
    return atomic_write_json(Path(log_dir) / SYSTEM_INFO_FILE, info)


# ------------------------------------------------------------------------------------------ pieces
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    """The CPU model ("AMD EPYC 7763 64-Core Processor"); platform.processor() is empty on most Linux."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=2)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _physical_cores() -> int:
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 0)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        return os.cpu_count() or 0


def _memory_total_gb() -> float:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 1024**3, 2)
    except Exception:  # noqa: BLE001
        try:
            return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 2)
        except (ValueError, OSError, AttributeError):
            return 0.0


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except Exception:  # noqa: BLE001 - report what we can without torch
        return {"torch_version": None, "cuda_available": False, "cuda_version": None, "gpu_count": 0,
                "gpu_names": [], "gpu_memory_gb": [], "cpu_capability": None, "bf16_supported": False}
    cuda = torch.cuda.is_available()
    gpu_count = torch.cuda.device_count() if cuda else 0
    names, mems = [], []
    for i in range(gpu_count):
        props = torch.cuda.get_device_properties(i)
        names.append(props.name)
        mems.append(round(props.total_memory / 1024**3, 2))
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        capability = None
    if cuda:
        bf16 = bool(torch.cuda.is_bf16_supported())
    else:  # native bf16 math on CPU needs AVX512-BF16 or AMX (autocast works without, but slowly)
        bf16 = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return {
        "torch_version": torch.__version__,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "gpu_count": gpu_count,
        "gpu_names": names,
        "gpu_memory_gb": mems,
        "cpu_capability": capability,
        "bf16_supported": bf16,
        "torch_num_threads": torch.get_num_threads(),
    }


def _git_info(cwd: Path) -> dict[str, Any]:
    """Commit of the working directory's repository (None outside one) and whether it has edits."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = None
    if commit:
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return {"git_commit": commit, "git_dirty": dirty}
