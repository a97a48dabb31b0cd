"""Which device and which mixed precision a run uses, decided once.

:func:`resolve_runtime` turns the ``--device`` / ``--mixed-precision`` settings into one :class:`Runtime`:
the device, the autocast dtype, whether a GradScaler is on. ``run.py`` resolves it once per process (each
torchrun rank for its own device) and hands the same value to the input checks, the system info and the
trainer; the one-shot commands (evaluate, encode, mine, adapt) use :func:`device_name`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .config import DEVICE_FORMS, DEVICE_RE
from .errors import ConfigError, DeviceError

#: dtype name -> dtype, for the names this package writes ("float32", "float16", "bfloat16")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_device_name(name: str, flag: str = "--device") -> str:
    """``name`` when it is one of the accepted forms (auto, cpu, cuda, cuda:N, mps), else a
    :class:`ConfigError` naming ``flag``: a misspelt device is a usage mistake, not a device failure.
    (``train`` checks ``optim.device`` the same way in the config validation.)"""
    if not isinstance(name, str) or not DEVICE_RE.fullmatch(name):
        raise ConfigError(f"{flag}: must be one of {', '.join(DEVICE_FORMS)}, got {name!r}", field=flag,
                          hint="e.g. auto (the default: the first GPU when there is one, else the CPU), cpu or cuda:0")
    return name


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU. A well-formed device this machine
    cannot give (CUDA or MPS missing, a GPU index past the last GPU) is a :class:`DeviceError`; a string
    torch does not know is one too here (the CLI refuses it earlier, as a ConfigError)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r}", hint=f"use {', '.join(DEVICE_FORMS)}",
                          original_exception=exc) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested but CUDA is not available", hint="use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) are "
                          "visible", hint="use --device cuda:0, or check CUDA_VISIBLE_DEVICES")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"device {name!r} requested but MPS is not available", hint="use --device cpu")
    return dev


def device_name(name: str, flag: str = "--device") -> str:
    """:func:`resolve_device` as a string, for the commands that pass a device name on (``auto`` -> ``cuda``);
    a malformed ``name`` is a :class:`ConfigError` naming ``flag``."""
    return str(resolve_device(check_device_name(name, flag)))


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls clearly faster than fp32 on this CPU (measured once per process, see :mod:`.cpu`)."""
    from .cpu import cpu_bf16_is_fast
    return cpu_bf16_is_fast()


def resolve_amp(mode: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where the device runs it natively, else fp16 with a GradScaler on CUDA, else fp32."""
    if mode == "no":
        return torch.float32
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("bf16 requested but this GPU does not support it", hint="use --mixed-precision fp16")
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Runtime:
    """Where a run computes and in which precision: resolved once, shared by everything that needs it."""

    device: torch.device
    amp_dtype: torch.dtype = torch.float32

    @property
    def amp_name(self) -> str:
        """``float32`` | ``float16`` | ``bfloat16``"""
        return dtype_name(self.amp_dtype)

    @property
    def uses_grad_scaler(self) -> bool:
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        return self.amp_dtype == torch.float16

    @property
    def eval_amp_dtype(self) -> torch.dtype | None:
        """The dtype evaluation runs under autocast with (None: full precision)."""
        return None if self.amp_dtype == torch.float32 else self.amp_dtype

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """A fresh autocast context for one forward (none in fp32), with :func:`attention_kernels`."""
        amp = nullcontext() if self.amp_dtype == torch.float32 else torch.autocast(device_type=self.device.type,
                                                                                    dtype=self.amp_dtype)
        with amp, attention_kernels(self.device):
            yield

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.uses_grad_scaler)


def resolve_runtime(device: str, mixed_precision: str) -> Runtime:
    """The run's :class:`Runtime` from its settings; raises :class:`DeviceError` for an unusable choice."""
    dev = resolve_device(device)
    return Runtime(device=dev, amp_dtype=resolve_amp(mixed_precision, dev))


def attention_kernels(device: torch.device) -> Any:
    """On CUDA, SDPA without its cuDNN backend (flash, memory-efficient, math); elsewhere a no-op context.

    Measured on an H100 with torch 2.11 (docs/benchmarks.md, "GPU check"): cuDNN's attention spent 4-5 ms of
    host time per call, forward and backward alike, at batch 16 with dynamic padding: 53 of a step's 62 ms,
    with the GPU busy 6.6 ms of it. The step runs autograd's backward outside this context; the kernel each
    attention call's backward uses is fixed by its forward.
    """
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
