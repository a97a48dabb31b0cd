"""System info: the seed's keys with their types, the `splade-obs sysinfo` command, no environment leaks."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from splade_obs.sysinfo import collect_system_info, save_system_info

OPT_STR = (str, type(None))
KEYS: dict[str, tuple[type, ...]] = {
    "python_version": (str,), "os": (str,), "cpu": (str,), "cpu_count": (int,), "cpu_count_logical": (int,),
    "memory_total_gb": (float, int), "torch_version": (str,), "cuda_available": (bool,), "cuda_version": OPT_STR,
    "gpu_count": (int,), "gpu_names": (list,), "transformers_version": (str,), "mlflow_version": (str,),
    "opentelemetry_version": (str,), "git_commit": OPT_STR, "mixed_precision": OPT_STR, "hostname": (str,),
    "cpu_capability": OPT_STR, "bf16_supported": (bool,),
}
PLANTED = {"MY_SERVICE_API_KEY": "sk-planted-123", "MLFLOW_TRACKING_PASSWORD": "hunter2-planted-pw",
           "SOME_HARMLESS_SETTING": "planted-harmless-value-42"}


def check_info(info: dict) -> None:
    for key, types in KEYS.items():
        assert key in info, key
        assert isinstance(info[key], types), (key, info[key])
    assert info["python_version"] == platform.python_version()
    assert info["cpu_count_logical"] >= info["cpu_count"] >= 1
    assert info["memory_total_gb"] > 0
    assert info["gpu_count"] == len(info["gpu_names"])
    assert all(isinstance(n, str) for n in info["gpu_names"])
    import torch

    assert info["torch_version"] == torch.__version__ and info["cuda_available"] == torch.cuda.is_available()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_keys_and_types(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # not a git repository
    info = collect_system_info("bf16")
    check_info(info)
    assert info["mixed_precision"] == "bf16"
    assert info["git_commit"] is None
    json.dumps(info)  # JSON-safe as is
    saved = save_system_info(info, tmp_path / "logs")
    assert json.loads(saved.read_text()) == info


def test_git_commit_of_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    try:
        subprocess.run([*git, "init", "-q"], check=True)
        (repo / "f.txt").write_text("x")
        subprocess.run([*git, "add", "f.txt"], check=True)
        subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"git unavailable: {exc}")
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.chdir(repo)
    info = collect_system_info()
    assert info["git_commit"] == head and info["git_dirty"] is False


def test_sysinfo_command_prints_json_without_env_values(monkeypatch) -> None:
    from splade_obs_cli.main import cli

    for k, v in PLANTED.items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(cli, ["sysinfo", "--mixed-precision", "fp16"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    check_info(info)
    assert info["mixed_precision"] == "fp16"
    for value in PLANTED.values():
        assert value not in res.output
    text = json.dumps(collect_system_info())
    for value in PLANTED.values():
        assert value not in text
