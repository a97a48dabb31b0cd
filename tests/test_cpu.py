"""The CPU bf16 probe: skipped where the x86 flags show emulation, run where they don't."""

from __future__ import annotations

import json
import platform
import sys

import pytest
import torch

from splade_obs import cpu

X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture
def fresh_probe(monkeypatch):
    monkeypatch.delenv("SPLADE_OBS_CPU_BF16", raising=False)
    cpu.bf16_matmul_speedup.cache_clear()
    yield
    cpu.bf16_matmul_speedup.cache_clear()


def _cpuinfo(tmp_path, monkeypatch, flags: str | None):
    path = tmp_path / "cpuinfo"
    lines = ["processor\t: 0", "model name\t: Some CPU"] + ([f"flags\t\t: {flags}"] if flags is not None else [])
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(cpu, "CPUINFO", path)


def _count_mm(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.skipif(not X86, reason="the flags check applies to x86 CPUs only")
def test_no_native_bf16_flag_skips_the_probe(tmp_path, monkeypatch, fresh_probe) -> None:
    _cpuinfo(tmp_path, monkeypatch, "fpu sse sse2 avx avx2 fma f16c avx512f avx512bw")
    calls = _count_mm(monkeypatch)
    assert cpu.x86_bf16_is_emulated() is True
    assert cpu.bf16_matmul_speedup() == 0.0 and cpu.cpu_bf16_is_fast() is False
    assert calls == []  # nothing timed


@pytest.mark.skipif(not X86, reason="the flags check applies to x86 CPUs only")
@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16"])
def test_a_native_bf16_flag_leaves_the_decision_to_the_probe(tmp_path, monkeypatch, fresh_probe, flag) -> None:
    _cpuinfo(tmp_path, monkeypatch, f"fpu sse avx2 avx512f {flag}")
    calls = _count_mm(monkeypatch)
    assert cpu.x86_bf16_is_emulated() is False
    assert cpu.bf16_matmul_speedup() > 0.0
    assert len(calls) == 12  # warm-up + 5 timed, for fp32 and for bf16


def test_unknown_flags_leave_the_decision_to_the_probe(tmp_path, monkeypatch, fresh_probe) -> None:
    _cpuinfo(tmp_path, monkeypatch, None)  # no flags line
    assert cpu.x86_bf16_is_emulated() is False
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "missing")
    assert cpu.x86_bf16_is_emulated() is False


def test_the_environment_variable_wins_over_flags(tmp_path, monkeypatch, fresh_probe) -> None:
    _cpuinfo(tmp_path, monkeypatch, "fpu avx2")
    monkeypatch.setenv("SPLADE_OBS_CPU_BF16", "1")
    assert cpu.cpu_bf16_is_fast() is True


# ---- the inference head's pass (fp32 / bf16 / int8), measured once per machine ---------------------------------

@pytest.fixture
def head_probe(tmp_path, monkeypatch):
    """A fresh process's view: no forced pass, no environment override, an empty probe cache in tmp_path."""
    for name in ("SPLADE_OBS_CPU_BF16", "SPLADE_OBS_HEAD_PASS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPLADE_OBS_CACHE", str(tmp_path / "cache"))
    cpu.set_head_pass(None)
    cpu._measured_passes.cache_clear()
    yield tmp_path / "cache" / cpu.PROBE_CACHE_FILE
    cpu.set_head_pass(None)
    cpu._measured_passes.cache_clear()


_SHAPES: list[tuple] = []


def _slow(monkeypatch, slow_dtypes: set | dict, seconds: float = 0.05) -> list[str]:
    """torch.mm / torch._int_mm that sleep for the given input dtypes (a dict: each its own seconds): a CPU where
    those passes are slow. Records each call's input dtype and shapes."""
    import time

    calls: list[str] = []
    delays = slow_dtypes if isinstance(slow_dtypes, dict) else dict.fromkeys(slow_dtypes, seconds)
    real_mm, real_int = torch.mm, getattr(torch, "_int_mm", None)

    def mm(a, b, *args, **kw):
        calls.append(str(a.dtype))
        shapes.append((tuple(a.shape), tuple(b.shape)))
        time.sleep(delays.get(a.dtype, 0.0))
        return real_mm(a, b, *args, **kw)

    def int_mm(a, b):
        calls.append("int8")
        shapes.append((tuple(a.shape), tuple(b.shape)))
        time.sleep(delays.get(torch.int8, 0.0))
        return real_int(a, b)

    shapes: list[tuple] = []
    monkeypatch.setattr(sys.modules[__name__], "_SHAPES", shapes)

    monkeypatch.setattr(torch, "mm", mm)
    if real_int is not None:
        monkeypatch.setattr(torch, "_int_mm", int_mm)
    monkeypatch.setattr(cpu, "x86_bf16_is_emulated", lambda: False)  # time bf16 whatever this CPU's flags say
    return calls


def test_auto_takes_fp32_when_the_low_precision_matmuls_measure_slow(head_probe, monkeypatch) -> None:
    calls = _slow(monkeypatch, {torch.bfloat16, torch.int8})
    assert cpu.head_pass() == "fp32"
    assert "torch.bfloat16" in calls  # decided by timing, not by the CPU's name
    entry = json.loads(head_probe.read_text())[cpu.machine_key()]
    assert entry["head_pass"] == "fp32" and entry["seconds"]["bf16"] > entry["seconds"]["fp32"]


def test_auto_takes_a_low_precision_pass_when_fp32_measures_slow(head_probe, monkeypatch) -> None:
    _slow(monkeypatch, {torch.float32: 0.05, torch.bfloat16: 0.02})
    assert cpu.head_pass() == ("int8" if cpu.int8_matmul_works() else "bf16")
    # a tile in the passes' layout: a block of 4096 terms against 256 tokens, maxed over the tokens
    timed = [shapes for shapes in _SHAPES if shapes[0][0] == 4096]
    passes = 3 if cpu.int8_matmul_works() else 2
    assert set(timed) == {((4096, 128), (128, 256))} and len(timed) == (cpu.TILE_REPEATS + 1) * passes


@pytest.mark.skipif(not cpu.int8_matmul_works(), reason="torch._int_mm does not run on this CPU build")
def test_training_takes_int8_when_it_beats_fp32_even_where_bf16_encodes_faster(head_probe, monkeypatch) -> None:
    """An AMX Xeon's case: bf16's tile is the fastest, so inference takes it, but training's choice is between
    int8 and the plain pass (whose backward recomputes the argmax), so it takes int8."""
    _slow(monkeypatch, {torch.float32: 0.05, torch.int8: 0.02})
    assert (cpu.head_pass(), cpu.head_pass(training=True)) == ("bf16", "int8")
    entry = json.loads(head_probe.read_text())[cpu.machine_key()]
    assert (entry["head_pass"], entry["training_pass"]) == ("bf16", "int8")
    cpu._measured_passes.cache_clear()
    _slow(monkeypatch, {torch.int8: 0.05})  # read from the cache: nothing timed again, the same answers
    assert (cpu.head_pass(), cpu.head_pass(training=True)) == ("bf16", "int8") and _SHAPES == []


def test_training_takes_the_plain_pass_when_int8_does_not_beat_fp32(head_probe, monkeypatch) -> None:
    _slow(monkeypatch, {torch.float32: 0.02, torch.int8: 0.05})
    assert cpu.head_pass(training=True) == "fp32"
    cpu.set_head_pass("int8" if cpu.int8_matmul_works() else "bf16")  # a forced pass is taken as it is
    assert cpu.head_pass(training=True) == cpu.forced_head_pass()


def test_an_earlier_probe_version_is_measured_again(head_probe, monkeypatch) -> None:
    key = cpu.machine_key()
    monkeypatch.setattr(cpu, "PROBE_VERSION", cpu.PROBE_VERSION - 1)
    assert cpu.machine_key() != key  # an answer cached by the former probe is not read


def test_the_measurement_is_cached_per_machine(head_probe, monkeypatch) -> None:
    calls = _slow(monkeypatch, {torch.bfloat16, torch.int8})
    first = cpu.head_pass()
    timed = len(calls)
    cpu._measured_passes.cache_clear()  # the next process on this machine
    assert cpu.head_pass() == first and len(calls) == timed  # read from the cache file: nothing timed
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # another machine as far as the answer goes: measured again
        cpu._measured_passes.cache_clear()
        cpu.head_pass()
        assert len(calls) > timed and len(json.loads(head_probe.read_text())) == 2
    finally:
        torch.set_num_threads(threads)


def test_the_flag_and_the_environment_override_the_measurement(head_probe, monkeypatch) -> None:
    from splade_obs.errors import ConfigError

    calls = _slow(monkeypatch, set())
    monkeypatch.setenv("SPLADE_OBS_HEAD_PASS", "bf16")
    assert cpu.head_pass() == "bf16"
    cpu.set_head_pass("fp32")  # --head-pass fp32 wins over the environment
    assert cpu.head_pass() == "fp32"
    cpu.set_head_pass("auto")
    monkeypatch.setenv("SPLADE_OBS_HEAD_PASS", "fp8")
    with pytest.raises(ConfigError, match="SPLADE_OBS_HEAD_PASS"):
        cpu.head_pass()
    with pytest.raises(ValueError):
        cpu.set_head_pass("fp8")
    assert calls == [] and not head_probe.exists()


def test_the_choice_weighs_each_pass_candidates_recompute() -> None:
    """bf16's tile a little faster than int8's, but its looser bound leaves twice the candidates to recompute in
    fp32: int8 costs less. Without the recompute share bf16 would win."""
    timings = {"fp32": 1.0, "bf16": 0.30, "int8": 0.31}
    assert cpu.pass_cost(timings, "bf16") == pytest.approx(0.30 + cpu.CANDIDATE_SHARE["bf16"])
    assert cpu.CANDIDATE_SHARE["bf16"] > cpu.CANDIDATE_SHARE["int8"] > 0
    assert cpu.choose_head_pass(timings) == "int8"
    assert cpu.choose_head_pass({"fp32": 1.0, "bf16": 0.25, "int8": 0.31}) == "bf16"  # a clearly faster tile wins
    assert cpu.choose_head_pass({"fp32": 0.36, "bf16": 0.30, "int8": 0.31}) == "fp32"  # not 1.25x below fp32
    assert cpu.choose_training_pass({"fp32": 1.0, "bf16": 0.1, "int8": 0.31}) == "int8"  # bf16 is not training's
    assert cpu.choose_training_pass({"fp32": 0.36, "int8": 0.31}) == "fp32"
    assert cpu.choose_training_pass({"fp32": 1.0, "bf16": 0.1}) == "fp32"  # no int8 on this build
