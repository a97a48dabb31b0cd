"""The CPU bf16 probe: skipped where the x86 flags show emulation, run where they don't."""

from __future__ import annotations

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
