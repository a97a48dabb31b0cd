"""Atomic writes: the streaming writer, the text/JSON writers on top of it, and the outputs of `encode` and
`mine-negatives`, which a failure midway must leave absent or as they were (never half-written)."""

from __future__ import annotations

import errno
import json
import os
import stat
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from splade_obs_cli.main import cli
from splade_obs import atomic
from splade_obs.atomic import atomic_write_json, atomic_write_text, atomic_writer
from splade_obs.errors import EXIT_CODES, ErrorCategory

from tests._eval_utils import read_jsonl, write_beir


def _names(folder: Path) -> list[str]:
    """Everything in ``folder``, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir())


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------------------------------ atomic_writer
def test_atomic_writer_writes_the_content_under_the_name_only_at_the_end(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.jsonl"  # the parent folder is created
    with atomic_writer(target) as f:
        f.write('{"a": 1}\n')
        assert not target.exists()  # nothing under the final name while writing
        f.write('{"b": "é"}\n')
    assert target.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    assert _names(target.parent) == ["out.jsonl"]


def test_atomic_writer_binary_mode(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    with atomic_writer(target, "wb") as f:
        f.write(b"\x00\x01\x02")
    assert target.read_bytes() == b"\x00\x01\x02"
    with pytest.raises(ValueError):
        with atomic_writer(tmp_path / "x.txt", "a"):
            pass
    assert _names(tmp_path) == ["blob.bin"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_an_exception_midway_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path: Path, exc) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("old content\n")
    with pytest.raises(type(exc)):
        with atomic_writer(target) as f:
            f.write("half of the new ")
            f.flush()
            raise exc
    assert target.read_text() == "old content\n"
    assert _names(tmp_path) == ["out.jsonl"]


def test_an_exception_midway_creates_nothing_when_there_was_no_file(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        with atomic_writer(tmp_path / "new.jsonl") as f:
            f.write("line\n")
            raise _disk_full()
    assert _names(tmp_path) == []


def test_a_failed_rename_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")

    def crash(src, dst):  # noqa: ANN001 - the process dies between write and rename
        raise _disk_full()

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and _names(tmp_path) == ["out.txt"]


def test_file_mode_is_a_normal_files_or_the_replaced_files(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.txt"
    with atomic_writer(fresh) as f:
        f.write("x")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's 0600
    private = tmp_path / "private.txt"
    private.write_text("old")
    private.chmod(0o600)
    atomic_write_text(private, "new")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and private.read_text() == "new"


def test_text_and_json_writers_go_through_the_streaming_writer(tmp_path: Path, monkeypatch) -> None:
    calls = []
    real = atomic.atomic_writer

    def spy(path, *args, **kwargs):  # noqa: ANN001
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(atomic, "atomic_writer", spy)
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write_json(tmp_path / "b.json", {"x": float("nan"), "p": tmp_path})
    assert calls == ["a.txt", "b.json"]
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": "nan", "p": str(tmp_path)}  # splade_obs.finite: "nan", strict JSON


# ------------------------------------------------------------------------------------------ encode, mine-negatives
def test_encode_failing_midway_leaves_no_output_and_keeps_a_previous_one(tmp_path: Path, monkeypatch) -> None:
    import splade_obs.encoding as encode

    beir = write_beir(tmp_path / "beir")
    real = encode.write_vectors

    def write_then_fail(f, ids, *args, **kwargs):  # noqa: ANN001 - rows reach the file, then the disk fills up
        real(f, ids[:3], *args, **kwargs)
        raise _disk_full()

    monkeypatch.setattr(encode, "write_vectors", write_then_fail)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["encode", "--model", "splade-tiny", "--input", str(beir), "--kind", "corpus", "--max-length", "16",
            "--batch-size", "4", "--output"]
    result = CliRunner().invoke(cli, [*args, str(out_dir / "docs.jsonl")])
    assert result.exit_code == EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR], result.output
    assert _names(out_dir) == []  # no output, no partial file

    (out_dir / "docs.jsonl").write_text("previous vectors\n")
    result = CliRunner().invoke(cli, [*args, str(out_dir / "docs.jsonl")])
    assert result.exit_code == EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR], result.output
    assert (out_dir / "docs.jsonl").read_text() == "previous vectors\n" and _names(out_dir) == ["docs.jsonl"]

    monkeypatch.setattr(encode, "write_vectors", real)  # and the same command, undisturbed, replaces it
    result = CliRunner().invoke(cli, [*args, str(out_dir / "docs.jsonl")])
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(out_dir / "docs.jsonl")) == 10 and _names(out_dir) == ["docs.jsonl"]


def test_write_jsonl_failing_midway_keeps_the_previous_file(tmp_path: Path) -> None:
    from splade_obs.mining import write_jsonl

    out = tmp_path / "triples.jsonl"
    write_jsonl([{"query": "q1"}, {"query": "q2"}], out)
    assert read_jsonl(out) == [{"query": "q1"}, {"query": "q2"}]
    with pytest.raises(TypeError):  # the second record cannot be serialized: the first was already written
        write_jsonl([{"query": "q3"}, {"query": object()}], out)
    assert read_jsonl(out) == [{"query": "q1"}, {"query": "q2"}] and _names(tmp_path) == ["triples.jsonl"]


def test_mine_negatives_failing_midway_leaves_no_output(tmp_path: Path, monkeypatch) -> None:
    import splade_obs.mining as mining

    data = write_beir(tmp_path / "beir", split="train")
    written = []

    def dumps_then_fail(obj, **kwargs):  # noqa: ANN001 - two records reach the file, then the disk fills up
        if len(written) == 2:
            raise _disk_full()
        written.append(obj)
        return json.dumps(obj, **kwargs)

    monkeypatch.setattr(mining, "json", types.SimpleNamespace(dumps=dumps_then_fail))
    out_dir = tmp_path / "out"
    result = CliRunner().invoke(cli, ["mine-negatives", "--model", "splade-tiny", "--data", str(data),
                                      "--output", str(out_dir / "triples.jsonl"), "--num-negatives", "2",
                                      "--depth", "8", "--max-query-length", "16", "--max-doc-length", "32",
                                      "--batch-size", "4"])
    assert result.exit_code == EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR], result.output
    assert len(written) == 2 and _names(out_dir) == []
