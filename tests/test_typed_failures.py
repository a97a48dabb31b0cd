"""Typed everywhere (issue 30): a full disk, however torch or safetensors wraps it, is a FILE_SYSTEM_ERROR
naming the path being written and the free space; a malformed ``--device`` is a CONFIG_ERROR naming the flag;
saved files get the process umask.

The full disk is real where the machine lets the tests mount a small tmpfs (they run as root in the project's
containers; skipped with the reason otherwise), and injected everywhere: the exceptions torch.save,
safetensors and Python raise on ENOSPC, through the real ``splade-obs train``.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from click.testing import CliRunner

from splade_obs.atomic import apply_umask, atomic_write_text, current_umask, writing
from splade_obs.errors import EXIT_CODES, ErrorCategory, FileSystemError, classify, is_storage_failure
from splade_obs_cli.main import cli

from tests.conftest import TINY_ARGS

FS_EXIT = EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR]
CONFIG_EXIT = EXIT_CODES[ErrorCategory.CONFIG_ERROR]
RUN = ["--max-steps", "1", "--no-mlflow", "--otel-exporter", "none", "--progress", "none", *TINY_ARGS]

#: The messages torch's zip writer raises when a write comes up short (torch 2.x, inline_container.cc).
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
TORCH_STREAM_WRITER = "PytorchStreamWriter failed writing file data/0: file write failed"
#: What safetensors (Rust) raises when the disk fills up.
SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"


def _enospc(filename: str | None = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([filename] if filename else []))


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    """``outer`` raised while handling ``inner``, as torch.save to a file object raises it."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer
    except BaseException as exc:  # noqa: BLE001
        return exc


def _safetensor_error(message: str) -> BaseException:
    from safetensors import SafetensorError

    return SafetensorError(message)


# ------------------------------------------------------------------------------------------------ classify
@pytest.mark.parametrize("make, errno_name", [
    (lambda: _enospc(), "ENOSPC"),
    (lambda: OSError(errno.EDQUOT, "Disk quota exceeded"), "EDQUOT"),
    (lambda: OSError(errno.EROFS, "Read-only file system"), "EROFS"),
    (lambda: RuntimeError(TORCH_SHORT_WRITE), None),
    (lambda: RuntimeError(TORCH_STREAM_WRITER), None),
    (lambda: _chained(RuntimeError(TORCH_SHORT_WRITE), _enospc()), "ENOSPC"),
    (lambda: _chained(RuntimeError("wrapped"), _enospc()), "ENOSPC"),
    (lambda: _safetensor_error(SAFETENSORS_ENOSPC), "ENOSPC"),
], ids=["oserror", "quota", "read-only", "torch-short-write", "torch-stream-writer", "torch-file-object",
        "chained", "safetensors"])
def test_a_refused_write_is_a_file_system_error_with_path_and_free_space(make, errno_name, tmp_path):
    exc = make()
    assert is_storage_failure(exc)
    err = classify(exc, ErrorCategory.TRAINING_ERROR, file_path=str(tmp_path / "ckpt" / "optimizer.pt"))
    assert isinstance(err, FileSystemError) and err.exit_code == FS_EXIT
    assert err.context["file_path"] == str(tmp_path / "ckpt" / "optimizer.pt")  # need not exist yet
    assert isinstance(err.context["free_bytes"], int) and err.context["free_bytes"] >= 0
    assert err.context.get("errno") == errno_name
    line = err.one_line()
    assert line.startswith(f"error[FILE_SYSTEM_ERROR]: {tmp_path / 'ckpt' / 'optimizer.pt'}: cannot write: ")
    assert "free on that file system" in line and "\n" not in line


def test_without_a_path_the_error_is_still_typed():
    err = classify(_safetensor_error(SAFETENSORS_ENOSPC))
    assert err.category is ErrorCategory.FILE_SYSTEM_ERROR and "no space left on device" in err.message
    err = classify(_enospc("/nowhere/file.bin"))  # Python's OSError names its file
    assert err.context["file_path"] == "/nowhere/file.bin" and "free on that file system" in err.message


@pytest.mark.parametrize("exc", [
    RuntimeError("unexpected pos 3"),  # not torch's writer
    RuntimeError("[enforce fail at inline_container.cc:300] . file not found: archive/data.pkl"),  # a read
    _safetensor_error("Error while deserializing header: HeaderTooLarge"),
    _safetensor_error("I/O error: Permission denied (os error 13)"),
    ValueError("No space left on device"),  # message text alone, without an errno, is not enough
], ids=["other-runtime", "torch-read", "safetensors-header", "safetensors-eacces", "value-error"])
def test_other_failures_are_not_taken_for_a_full_disk(exc):
    assert not is_storage_failure(exc)
    assert classify(exc, ErrorCategory.TRAINING_ERROR).category is ErrorCategory.TRAINING_ERROR


def test_writing_names_the_path_and_lets_other_errors_through(tmp_path):
    target = tmp_path / "sub" / "weights.bin"
    with pytest.raises(FileSystemError) as info:
        with writing(target):
            raise RuntimeError(TORCH_SHORT_WRITE)
    assert info.value.context["file_path"] == str(target) and "the disk may be full" in info.value.message
    with pytest.raises(KeyError):
        with writing(target):
            raise KeyError("x")
    with pytest.raises(FileSystemError, match="already typed"):
        with writing(target):
            raise FileSystemError("already typed", file_path="elsewhere")


def test_atomic_write_on_a_full_disk_names_the_target(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    def full(fd):
        raise _enospc()

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:  # still the OSError (callers catch it), now naming the target
        atomic_write_text(target, "{}")
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    err = classify(info.value)
    assert isinstance(err, FileSystemError) and err.context["file_path"] == str(target)
    assert "no space left on device" in err.message and "free on that file system" in err.message
    assert not target.exists() and list(tmp_path.iterdir()) == []  # the temporary file is gone too


# ------------------------------------------------------------------------------------------------ through the CLI
def _train(tmp_path: Path, *extra: str):
    return CliRunner().invoke(cli, ["train", "--output-dir", str(tmp_path / "out"), *RUN, *extra])


def _error_lines(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("error[")]


@pytest.mark.parametrize("part, raise_, says", [
    ("optimizer.pt", lambda: RuntimeError(TORCH_SHORT_WRITE), "cannot write: "),
    ("optimizer.pt", lambda: RuntimeError(TORCH_STREAM_WRITER), "cannot write: "),
    ("optimizer.pt", lambda: _chained(RuntimeError(TORCH_SHORT_WRITE), _enospc()), "no space left on device"),
    ("rng.pt", lambda: _enospc(), "no space left on device"),
    ("model", lambda: _safetensor_error(SAFETENSORS_ENOSPC), "no space left on device"),
    ("trainer_state.json", lambda: _enospc(), "no space left on device"),
], ids=["torch-short-write", "torch-stream-writer", "torch-file-object", "oserror", "safetensors", "json"])
def test_a_full_disk_during_a_checkpoint_exits_with_the_file_system_code(part, raise_, says, tmp_path, monkeypatch):
    """The exception each writer raises on ENOSPC, injected where that writer runs, through `splade-obs train`:
    exit 9, one line naming the checkpoint file and the free space, no traceback, no retry, no partial folder."""
    calls = []
    if part == "model":
        import transformers.modeling_utils as mu

        def fail_weights(*a, **k):
            calls.append(part)
            raise raise_()

        monkeypatch.setattr(mu, "safe_save_file", fail_weights)
    elif part.endswith(".pt"):
        real_save = torch.save

        def save(obj, f, *a, **k):
            if isinstance(f, (str, os.PathLike)) and Path(f).name == part:
                calls.append(part)
                raise raise_()
            return real_save(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", save)
    else:
        real_write_text = Path.write_text

        def write_text(self, *a, **k):
            if self.name == part:
                calls.append(part)
                raise raise_()
            return real_write_text(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)

    res = _train(tmp_path)
    assert res.exit_code == FS_EXIT, res.output + res.stderr
    lines = _error_lines(res)
    assert len(lines) == 1, res.stderr
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-1"
    assert lines[0].startswith(f"error[FILE_SYSTEM_ERROR]: {ckpt / part}: cannot write: "), lines[0]
    assert says in lines[0] and "free on that file system" in lines[0]
    assert "Traceback" not in res.output + res.stderr
    assert calls == [part]  # a full disk is not retried
    assert list((tmp_path / "out" / "checkpoints").iterdir()) == []  # no checkpoint, no temporary folder left


def test_a_full_disk_while_writing_the_final_model_names_it_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    real = mu.safe_save_file

    def fail_final(tensors, filename, *a, **k):
        if ".tmp-final-" in str(filename):
            raise _safetensor_error(SAFETENSORS_ENOSPC)
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(mu, "safe_save_file", fail_final)
    res = _train(tmp_path)
    assert res.exit_code == FS_EXIT, res.output + res.stderr
    (line,) = _error_lines(res)
    assert line.startswith(f"error[FILE_SYSTEM_ERROR]: {tmp_path / 'out' / 'final'}: cannot write: "), line
    assert "free on that file system" in line and "Traceback" not in res.output + res.stderr
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]


@contextlib.contextmanager
def small_tmpfs(where: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` MiB mounted at ``where`` for the block; skips the test where mounting is not
    allowed (not root, no mount tool, a container without CAP_SYS_ADMIN)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount/umount tool on this machine")
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {proc.stderr.strip() or proc.returncode}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _splade_obs() -> list[str]:
    script = Path(sys.executable).with_name("splade-obs")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c",
            "import sys; from splade_obs_cli.main import main; sys.argv[0] = 'splade-obs'; main()"]


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_real_full_disk_during_a_checkpoint(writer, tmp_path, tiny_model_path):
    """A real ENOSPC: the output dir on a tmpfs too small for the checkpoint. 2 MiB: the model weights
    (safetensors) do not fit; the weights' size plus 3 MiB: the weights fit, optimizer.pt (torch.save's zip
    writer) does not."""
    weights = (Path(tiny_model_path) / "model.safetensors").stat().st_size
    size = 2 if writer == "safetensors" else math.ceil(weights / 2**20) + 3
    with small_tmpfs(tmp_path / "small", size) as mnt:
        out = mnt / "out"
        proc = subprocess.run([*_splade_obs(), "train", "--output-dir", str(out), *RUN], capture_output=True,
                              text=True, timeout=600, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error[")]
        assert proc.returncode == FS_EXIT, proc.stderr[-3000:]
        assert len(lines) == 1, proc.stderr[-3000:]
        part = "model" if writer == "safetensors" else "optimizer.pt"
        ckpt = out / "checkpoints" / "checkpoint-1"
        assert lines[0].startswith(f"error[FILE_SYSTEM_ERROR]: {ckpt / part}: cannot write: "), lines[0]
        words = "no space left on device (" if writer == "safetensors" else "the disk is full ("
        assert words in lines[0] and " free on that file system)" in lines[0], lines[0]
        assert "Traceback" not in proc.stdout + proc.stderr
        assert list((out / "checkpoints").iterdir()) == []  # the partial checkpoint was removed


# ------------------------------------------------------------------------------------------------ --device
@pytest.mark.parametrize("device", ["tpu:7", "cuda:x", "gpu"])
def test_a_malformed_device_is_a_config_error_naming_the_flag(device, tmp_path):
    res = _train(tmp_path, "--device", device)
    assert res.exit_code == CONFIG_EXIT, res.output + res.stderr
    line = _error_lines(res)[0]
    assert line == (f"error[CONFIG_ERROR]: command line: optim.device: must be one of auto, cpu, cuda, cuda:N, mps, "
                    f"got {device!r} (--device)")
    assert "Expected one of" not in res.stderr and not (tmp_path / "out").exists()


def test_one_shot_commands_check_the_device_flag_too(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"id": "1", "text": "hello"}\n')
    res = CliRunner().invoke(cli, ["encode", "--kind", "corpus", "--model", "splade-tiny", "--input", str(data),
                                   "--output", str(tmp_path / "o.jsonl"), "--device", "tpu:7"])
    assert res.exit_code == CONFIG_EXIT, res.output + res.stderr
    assert _error_lines(res) == ["error[CONFIG_ERROR]: --device: must be one of auto, cpu, cuda, cuda:N, mps, "
                                 "got 'tpu:7'"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_valid_device_the_machine_lacks_is_still_a_device_error(tmp_path):
    res = _train(tmp_path, "--device", "cuda:0")
    assert res.exit_code == EXIT_CODES[ErrorCategory.DEVICE_ERROR], res.output + res.stderr
    assert _error_lines(res)[0] == "error[DEVICE_ERROR]: device 'cuda:0' requested but CUDA is not available"


# ------------------------------------------------------------------------------------------------ umask
@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in sorted(root.rglob("*"))
            if not p.is_symlink()}


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_every_saved_file_gets_the_process_umask(mask, tmp_path):
    """Checkpoints (with safetensors' weights, which it writes 0600), final/, the logs and metrics files: all
    0644 / 0755 under umask 022, 0640 / 0750 under 027."""
    with umask(mask):
        assert current_umask() == mask
        res = _train(tmp_path, "--max-steps", "2", "--save-steps", "1", "--json-logs")
    assert res.exit_code == 0, res.output + res.stderr
    out = tmp_path / "out"
    modes = _modes(out)
    assert "final/model.safetensors" in modes and "checkpoints/checkpoint-2/model/model.safetensors" in modes
    assert "logs/training_metrics.json" in modes
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (want_dir if (out / name).is_dir() else want_file)}
    assert not wrong, f"not {oct(want_file)}/{oct(want_dir)} under umask {oct(mask)}: {wrong}"


def test_apply_umask_fixes_private_temporaries_and_keeps_executables(tmp_path):
    root = tmp_path / "staged"
    (root / "model").mkdir(parents=True)
    os.chmod(root, 0o700)
    weights, tool = root / "model" / "model.safetensors", root / "run.sh"
    weights.write_bytes(b"x")
    tool.write_text("#!/bin/sh\n")
    os.chmod(weights, 0o600)
    os.chmod(tool, 0o700)
    with umask(0o022):
        apply_umask(root)
        assert _modes(root) == {"model": 0o755, "model/model.safetensors": 0o644, "run.sh": 0o755}
        assert stat.S_IMODE(root.stat().st_mode) == 0o755
    with umask(0o077):
        atomic_write_text(tmp_path / "private.json", "{}")
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
