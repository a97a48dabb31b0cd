"""The CPU bf16 probe: skipped where the x86 flags show emulation, run where they don't."""

from __future__ import annotations

import json
import platform

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
    cpu._measured_head_pass.cache_clear()
    yield tmp_path / "cache" / cpu.PROBE_CACHE_FILE
    cpu.set_head_pass(None)
    cpu._measured_head_pass.cache_clear()


def _slow(monkeypatch, slow_dtypes: set, seconds: float = 0.05) -> list[str]:
    """torch.mm / torch._int_mm that sleep for the given input dtypes: a CPU where those passes are slow."""
    import time

    calls: list[str] = []
    real_mm, real_int = torch.mm, getattr(torch, "_int_mm", None)

    def mm(a, b, *args, **kw):
        calls.append(str(a.dtype))
        if a.dtype in slow_dtypes:
            time.sleep(seconds)
        return real_mm(a, b, *args, **kw)

    def int_mm(a, b):
        calls.append("int8")
        if torch.int8 in slow_dtypes:
            time.sleep(seconds)
        return real_int(a, b)

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
    _slow(monkeypatch, {torch.float32})
    assert cpu.head_pass() == ("int8" if cpu.int8_matmul_works() else "bf16")


def test_the_measurement_is_cached_per_machine(head_probe, monkeypatch) -> None:
    calls = _slow(monkeypatch, {torch.bfloat16, torch.int8})
    first = cpu.head_pass()
    timed = len(calls)
    cpu._measured_head_pass.cache_clear()  # the next process on this machine
    assert cpu.head_pass() == first and len(calls) == timed  # read from the cache file: nothing timed
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # another machine as far as the answer goes: measured again
        cpu._measured_head_pass.cache_clear()
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
