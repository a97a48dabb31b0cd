"""What this CPU is fast at, measured rather than assumed.

torch's ``get_cpu_capability()`` names the ATen vector ISA (e.g. ``AVX512``) but not whether oneDNN's bf16
matrix kernels (AMX, AVX512-BF16) are usable, and emulated bf16 is slower than fp32. So the answer comes
from a ~20 ms timing of the SPLADE head's own shape, once per process. Where emulation is certain (an x86
CPU whose Linux flags list neither ``avx512_bf16`` nor ``amx_bf16``) the probe is skipped: emulated, it
takes seconds (3 s on an AVX2 AMD EPYC), paid by every command.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

#: Where Linux lists the CPU's flags (a module constant so that tests can point it at a written file).
CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def x86_bf16_is_emulated() -> bool:
    """True on an x86 CPU whose flags (Linux ``/proc/cpuinfo``) show no native bf16 matrix instructions.

    False where that cannot be told (another architecture or OS, unreadable file): the probe decides then.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return not NATIVE_BF16_FLAGS & set(line.partition(":")[2].split())
    return False


@functools.lru_cache(maxsize=None)
def bf16_matmul_speedup() -> float:
    """fp32 time / bf16 time of a ``(256 x 128) @ (128 x 4096)`` matmul on this CPU (> 1: bf16 is faster).

    0.0 without timing anything where the CPU flags show that bf16 would be emulated.
    """
    forced = os.environ.get("SPLADE_OBS_CPU_BF16")
    if forced is not None:  # "1"/"0": skip the probe (reproducible CI, or a known machine)
        return 2.0 if forced == "1" else 0.5
    if x86_bf16_is_emulated():
        return 0.0
    a, b = _head_shaped_operands()
    return _best_time(torch.mm, a, b) / max(_best_time(torch.mm, a.bfloat16(), b.bfloat16()), 1e-9)


def _head_shaped_operands() -> tuple[torch.Tensor, torch.Tensor]:
    """``(256 x 128)`` and ``(128 x 4096)``: 256 tokens of a 128-wide model against a block of the vocabulary."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(256, 128, generator=gen), torch.randn(128, 4096, generator=gen)


def _best_time(fn: Any, x: torch.Tensor, y: torch.Tensor, repeats: int = 5) -> float:
    """The best of ``repeats`` timed calls ``fn(x, y)`` after a warm-up call (first calls pick the kernels)."""
    fn(x, y)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x, y)
        best = min(best, time.perf_counter() - t)
    return best


def cpu_bf16_is_fast(threshold: float = 1.25) -> bool:
    """True when bf16 matmuls beat fp32 clearly on this CPU (native bf16 kernels, not emulation)."""
    return bf16_matmul_speedup() >= threshold


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library, another OS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_heap() -> bool:
    """Give the memory the C heap holds free back to the operating system (glibc's ``malloc_trim(0)``).

    Encoding allocates a few ``batch x vocabulary`` float tensors per batch (15.6 MB each at batch 128 with
    BERT's 30,522 terms); glibc serves those from its heap once a freed one has raised its mmap threshold, and
    the heap keeps the freed space fragmented, so the resident memory climbs by about one such tensor a batch
    without anything being live (measured: 8,192 documents at batch 128 in one call, anonymous RSS 300 ->
    1,300 MB). :meth:`splade_obs.model.SpladeEncoder.encode` calls this after every batch on CPU: the peak stays
    at ~410 MB, the cost (~7 ms a call) is inside the run-to-run noise of a 200 ms batch, and a fixed mmap
    threshold (``mallopt``), the other cure, made encoding 12-20% slower with its page faults. A no-op
    returning False where glibc is not the C library.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


# ---- the head's pass: fp32, or a bf16 / int8 prefilter, chosen by measuring ----------------------------------

#: The passes :func:`head_pass` chooses from: ``fp32`` (every term's token max in fp32), ``bf16`` and ``int8``
#: (a low-precision pass over the whole vocabulary selects the terms that can be non-zero, with a proven error
#: bound, and only those are computed in fp32: :mod:`splade_obs.model`).
HEAD_PASSES = ("fp32", "bf16", "int8")
#: A low-precision pass must be this much faster than fp32 to be chosen (it also pays the candidates' recompute).
HEAD_PASS_MARGIN = 1.25
PROBE_CACHE_FILE = "cpu-probe.json"
#: Bumped when :func:`head_pass_timings` measures something else: answers cached by an earlier probe are not read.
PROBE_VERSION = 2
#: Timed calls per pass in :func:`head_pass_timings` (a tile takes 0.3-1 ms: the best of 15 is stable to ~3%)
TILE_REPEATS = 15
_forced_head_pass: str | None = None


def set_head_pass(name: str | None) -> str | None:
    """Force the head's pass for this process (``--head-pass``); None or ``auto`` goes back to measuring.
    Returns the pass forced before (None: none), for putting it back. ``int8`` where ``torch._int_mm`` does not
    run is a ValueError."""
    global _forced_head_pass
    if name not in (None, "auto", *HEAD_PASSES):
        raise ValueError(f"head pass {name!r}: expected auto or one of {', '.join(HEAD_PASSES)}")
    if name == "int8" and not int8_matmul_works():
        raise ValueError("int8 needs torch._int_mm, which does not run on this CPU build of torch "
                         "(use auto, fp32 or bf16)")
    before, _forced_head_pass = _forced_head_pass, (None if name in (None, "auto") else name)
    return before


def forced_head_pass() -> str | None:
    """The pass :func:`set_head_pass` forced, or None (measured or from the environment)."""
    return _forced_head_pass


def int8_matmul_works() -> bool:
    """Whether ``torch._int_mm`` (int8 x int8 -> int32) runs on this CPU build of torch."""
    fn = getattr(torch, "_int_mm", None)
    if fn is None:
        return False
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 128), generator=gen, dtype=torch.int8)  # odd shapes: a document's tokens
    b = torch.randint(-127, 128, (128, 13), generator=gen, dtype=torch.int8)
    try:
        out = fn(a, b)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return bool(out.dtype == torch.int32 and torch.equal(out, a.int() @ b.int()))


def head_pass_timings() -> dict[str, float]:
    """Seconds of one tile in the passes' own layout (best of 15 after a warm-up): a block of 4096 terms
    against 256 tokens of a 128-wide model, ``(4096 x 128) @ (128 x 256)``, and each term's max over the tokens.
    fp32 always, bf16 unless the CPU flags show it emulated, int8 where ``torch._int_mm`` runs.

    The layout and the reduction are the passes' own: timed as a plain ``(256 x 128) @ (128 x 4096)`` product,
    bf16 came out 1.8x faster than int8 on an AMX Xeon, where the int8 pass evaluates SciFact 1.30x and trains
    1.33x faster than the bf16 ones (docs/benchmarks.md, "The vocabulary pass: fp32, bf16, int8")."""
    a, b = _head_shaped_operands()
    terms, tokens = b.t().contiguous(), a.t().contiguous()  # (4096, 128), (128, 256)
    timings = {"fp32": _best_time(_plain_tile, terms, tokens, TILE_REPEATS)}
    if not x86_bf16_is_emulated():
        timings["bf16"] = _best_time(_bf16_tile, terms.bfloat16(), tokens.bfloat16(), TILE_REPEATS)
    if int8_matmul_works():
        as_int8 = (lambda t: (t * 20).clamp(-127, 127).to(torch.int8))  # noqa: E731
        timings["int8"] = _best_time(_int8_tile, as_int8(terms), as_int8(tokens), TILE_REPEATS)
    return timings


def _plain_tile(terms: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.mm(terms, tokens).amax(dim=1)


def _bf16_tile(terms: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return _plain_tile(terms, tokens).float()


def _int8_tile(terms: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(terms, tokens).amax(dim=1)


#: Share of the vocabulary each prefilter leaves to the fp32 recompute: splade-tiny on 32 SciFact documents,
#: 637 (int8) and 1,346 (bf16, whose bound is looser) candidates of 30,522 terms a document, 254 of them non-zero.
CANDIDATE_SHARE = {"bf16": 1346 / 30522, "int8": 637 / 30522}


def pass_cost(timings: dict[str, float], name: str) -> float:
    """A pass's time per tile: its own tile, plus its candidates' share of an fp32 tile for the recompute."""
    return timings[name] + CANDIDATE_SHARE.get(name, 0.0) * timings["fp32"]


def choose_head_pass(timings: dict[str, float]) -> str:
    """The low-precision pass of least :func:`pass_cost` if that beats fp32 by :data:`HEAD_PASS_MARGIN`, else
    ``fp32``."""
    low = min((pass_cost(timings, name), name) for name in timings if name != "fp32") if len(timings) > 1 else None
    if low is not None and low[0] * HEAD_PASS_MARGIN <= timings["fp32"]:
        return low[1]
    return "fp32"


def choose_training_pass(timings: dict[str, float]) -> str:
    """``int8`` if its tile beats fp32's by :data:`HEAD_PASS_MARGIN`, else ``fp32`` (the plain pass, in the run's
    autocast dtype). Training has no bf16 prefilter to weigh against int8: its other pass is the plain one,
    whose backward recomputes every argmax in fp32, which the int8 pass keeps from its forward. int8 is weighed
    against fp32's tile whatever the autocast dtype (the answer is cached per machine, not per run): on an AMX
    Xeon, where bf16's tile is as fast as int8's, int8 still trains 1.33x faster than the plain bf16 pass."""
    return "int8" if "int8" in timings and pass_cost(timings, "int8") * HEAD_PASS_MARGIN <= timings["fp32"] else "fp32"


def machine_key() -> str:
    """What the probe's answer depends on: the CPU (model and flags), torch's version, its thread count and the
    probe's own version (:data:`PROBE_VERSION`)."""
    import hashlib

    cpu_lines = ""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
        cpu_lines = "\n".join(sorted({ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))}))
    except OSError:
        pass
    raw = "|".join([platform.machine(), platform.processor(), cpu_lines, torch.__version__,
                    str(torch.get_num_threads()), f"probe {PROBE_VERSION}"])
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:16]


def probe_cache_path() -> Path:
    """``$SPLADE_OBS_CACHE/cpu-probe.json`` (default ``~/.cache/splade-obs``): the probe's answers per machine."""
    from .hub import cache_root

    return cache_root() / PROBE_CACHE_FILE


@functools.lru_cache(maxsize=None)
def _measured_passes() -> tuple[str, str]:
    """``(inference pass, training pass)`` from :func:`head_pass_timings`, read from or written to the cache."""
    import json
    import logging

    log = logging.getLogger("splade_obs.cpu")
    key, path = machine_key(), probe_cache_path()
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("head_pass") in HEAD_PASSES and entry.get("training_pass") in HEAD_PASSES:
        return str(entry["head_pass"]), str(entry["training_pass"])
    timings = head_pass_timings()
    choice = (choose_head_pass(timings), choose_training_pass(timings))
    known = known if isinstance(known, dict) else {}
    known[key] = {"head_pass": choice[0], "training_pass": choice[1], "seconds": timings,
                  "threads": torch.get_num_threads(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        from .atomic import atomic_write_text

        atomic_write_text(path, json.dumps(known, indent=1, sort_keys=True) + "\n")
    except OSError as exc:  # a read-only home: measured again next time
        log.debug("could not cache the CPU probe in %s: %s", path, exc)
    log.debug("head pass %s, training pass %s (measured: %s)", *choice, timings)
    return choice


def head_pass(training: bool = False) -> str:
    """The head's pass on this CPU: ``--head-pass`` / :func:`set_head_pass`, else ``SPLADE_OBS_HEAD_PASS``, else
    ``SPLADE_OBS_CPU_BF16`` (``1``: bf16, ``0``: fp32), else measured once per machine
    (:func:`head_pass_timings`, cached in :func:`probe_cache_path` under :func:`machine_key`). ``training``:
    the pass of a forward with gradients, which takes only ``int8`` (any other answer means the plain pass):
    a forced pass as it is, a measured one by :func:`choose_training_pass`."""
    if _forced_head_pass is not None:
        return _forced_head_pass
    forced = os.environ.get("SPLADE_OBS_HEAD_PASS")
    if forced and forced != "auto":
        if forced not in HEAD_PASSES:
            from .errors import ConfigError

            raise ConfigError(f"SPLADE_OBS_HEAD_PASS={forced!r}: expected auto or one of {', '.join(HEAD_PASSES)}")
        return forced
    legacy = os.environ.get("SPLADE_OBS_CPU_BF16")
    if legacy is not None:
        return "bf16" if legacy == "1" else "fp32"
    return _measured_passes()[1 if training else 0]


def training_kernels(encoder: Any, device: torch.device, pass_choice: str, dropout_masks: str,
                     amp_dtype: torch.dtype) -> tuple[str, str]:
    """Set up a CPU training run's head pass (``model.head_pass``, process-wide: the trainer puts the former one
    back at the end) and dropout masks (``model.cpu_dropout``) on ``encoder``. Returns what the run uses,
    ``("", "")`` off CPU: ``int8`` where that pass is chosen and the head is split, else the autocast dtype the
    plain pass runs in (``bf16``, ``fp16``, ``fp32``); and ``fast`` or ``torch``. Off CPU the attention's mask
    is built without reading the padding back from the device (:func:`splade_obs.dropout.padding_mask`)."""
    if device.type != "cpu":
        from .dropout import install_attention

        install_attention(encoder.mlm)
        return "", ""
    try:
        set_head_pass(pass_choice)
    except ValueError as exc:
        from .errors import ConfigError

        raise ConfigError(f"model.head_pass = {pass_choice}: {exc}", hint="use --head-pass auto, fp32 or bf16") from exc
    plain = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")
    label = "int8" if head_pass(training=True) == "int8" and getattr(encoder, "fused_head", False) else plain
    masks = "torch"
    if dropout_masks == "fast":
        from .dropout import install

        done = install(encoder.mlm)
        masks = "fast" if done["dropouts"] or done["attention"] else "torch"
    return label, masks
