"""scripts/gpu_bundle.py: the wheels, model and data a lent GPU machine needs for benchmarks/gpu_check.py, in
folders git ignores, within the device tool's carry limit, and the call that runs the check there."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO.parent / "shared" / "data" / "scifact"


@pytest.fixture(scope="module")
def bundle():
    spec = importlib.util.spec_from_file_location("gpu_bundle", REPO / "scripts" / "gpu_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_bundle_holds_the_model_and_data_and_prints_the_call(bundle, tmp_path, capsys, tiny_model_path):
    data = SCIFACT if (SCIFACT / "corpus.jsonl").is_file() else tmp_path / "absent"
    assert bundle.main(["--root", str(tmp_path), "--data", str(data), "--no-download"]) == 0
    out = capsys.readouterr().out
    model = tmp_path / ".gpudata" / "cache" / "models" / "splade-tiny"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert _sha(model / name) == _sha(Path(tiny_model_path) / name), name
    if data == SCIFACT:
        assert _sha(tmp_path / ".gpudata" / "scifact" / "corpus.jsonl") == _sha(SCIFACT / "corpus.jsonl")
    else:
        assert "the check will use the demo data" in out and not (tmp_path / ".gpudata" / "scifact").exists()
    assert "carry=['.whl', '.gpudata']" in out and "gpu_check.py --data ../.gpudata/scifact" in out
    assert "SPLADE_OBS_CACHE=../.gpudata/cache" in out and "MiB to carry" in out
    # a second call replaces what the first wrote
    assert bundle.main(["--root", str(tmp_path), "--data", str(data), "--no-download"]) == 0


def test_over_the_carry_limit_is_an_error(bundle, tmp_path, capsys, monkeypatch, tiny_model_path):
    monkeypatch.setattr(bundle, "CARRY_LIMIT", 1024)
    assert bundle.main(["--root", str(tmp_path), "--data", str(tmp_path / "absent"), "--no-download"]) == 1
    assert "over the device tool's" in capsys.readouterr().err


def test_git_ignores_what_the_bundle_writes():
    """SciFact is CC BY-NC and must never be committed; the wheels are build output."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (".gpudata/scifact/corpus.jsonl", ".gpudata/cache/models/splade-tiny/model.safetensors",
                 ".whl/datasets-5.2.0-py3-none-any.whl"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path


def test_the_wheels_are_pinned_to_this_environment_and_pip_finds_them_for_the_image(bundle, tmp_path):
    wanted = bundle.specs()
    assert [s.split("==")[0] for s in wanted] == list(bundle.PACKAGES)
    assert all(s.split("==")[1] == version(s.split("==")[0]) for s in wanted)
    # one small pure-Python wheel through pip's real download, with the image's interpreter and platform
    small = next(s for s in wanted if s.startswith("annotated-types=="))
    proc = subprocess.run(bundle.download_command([small], tmp_path), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and ("Could not" in proc.stderr or "connection" in proc.stderr.lower()):
        pytest.skip(f"PyPI not reachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.glob("*.whl")] == [f"annotated_types-{small.split('==')[1]}-py3-none-any.whl"]
