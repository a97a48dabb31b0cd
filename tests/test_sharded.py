"""Sharded encode / evaluate / mine-negatives under torchrun (2 gloo ranks on CPU) equal one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from splade_obs.encoding import iter_records
from splade_obs.shard import Shard, part_path, shard_from_env
from splade_obs_cli.main import cli

from ._eval_utils import read_jsonl, write_beir
from ._torchrun import torchrun_env

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "splade_obs_cli.main"]
QUALITY = ("ndcg@10", "mrr@10", "recall@100", "map@100", "query_nnz", "doc_nnz", "retrieval_flops",
           "index_size_mb", "num_docs", "num_queries")


def _env() -> dict[str, str]:
    return torchrun_env()


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *args, "--progress", "none"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=240)


def _single(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = CliRunner().invoke(cli, [*args, "--progress", "none"])
    assert result.exit_code == 0, result.output


def _vectors(path: Path) -> list[tuple[str, dict[str, float]]]:
    return [(r["id"], r["vector"]) for r in read_jsonl(path)]


def _assert_same_vectors(a: Path, b: Path) -> None:
    """Same ids in the same order, same weights up to float32 rounding: a batch padded to another length, or run
    on another thread count (the ranks run one thread each, this process two), sums in another order. A logit is
    a 128-term dot product of magnitude ~30 here, so its rounding is absolute, not relative to the weight: 1.4e-6
    on a weight of 0.09 on an AMX Xeon. The documented bound is H * 2^-24 * ||h|| * ||w_v|| (~2e-4)."""
    va, vb = _vectors(a), _vectors(b)
    assert [i for i, _ in va] == [i for i, _ in vb] and len(va) == 10  # input order
    for (_, x), (_, y) in zip(va, vb):
        for term in set(x) | set(y):
            assert x.get(term, 0.0) == pytest.approx(y.get(term, 0.0), rel=1e-5, abs=1e-5), term


def _run_lines(path: Path) -> list[tuple[str, str, int, float]]:
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(q, d, int(rank), float(score)) for q, _, d, rank, score, _ in rows]


def test_shard_bounds_are_contiguous_balanced_and_cover_everything():
    for n in (0, 1, 5, 10, 11):
        for world in (1, 2, 3, 4):
            shards = [Shard(rank=r, world_size=world, local_rank=r) for r in range(world)]
            spans = [s.bounds(n) for s in shards]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(spans[i][1] == spans[i + 1][0] for i in range(world - 1))
            counts = shards[0].counts(n)
            assert counts == [hi - lo for lo, hi in spans] and max(counts) - min(counts) <= 1
    assert part_path("out/v.jsonl", 1, 2) == Path("out/.v.jsonl.part1-of-2")


def test_records_of_a_span_skip_blank_lines_like_the_whole_file(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"_id": f"d{i}", "text": f"text {i}"}) for i in range(7)]
    path.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n\n")
    whole = list(iter_records(path, "queries"))
    parts = [list(iter_records(path, "queries", span=s)) for s in ((0, 2), (2, 5), (5, 7))]
    assert [r for p in parts for r in p] == whole and len(whole) == 7


def test_without_torchrun_no_process_group_is_made(monkeypatch):
    import torch.distributed as tdist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert shard_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert shard_from_env() is None
    assert not tdist.is_initialized()


def test_sharded_encode_equals_single_process(tmp_path, monkeypatch):
    beir = write_beir(tmp_path / "beir")
    proc = _torchrun(tmp_path, "encode", "--model", "splade-tiny", "--input", str(beir), "--kind", "corpus",
                     "--output", str(tmp_path / "two.jsonl"), "--batch-size", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks encoded 5, 5 records" in proc.stderr
    _single(monkeypatch, "encode", "--model", "splade-tiny", "--input", str(beir), "--kind", "corpus",
            "--output", str(tmp_path / "one.jsonl"), "--batch-size", "3")
    _assert_same_vectors(tmp_path / "two.jsonl", tmp_path / "one.jsonl")
    assert not list(tmp_path.glob(".two.jsonl.*"))  # parts merged and removed


def test_a_failing_rank_stops_every_rank_and_leaves_no_output(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    good = [json.dumps({"_id": f"d{i}", "text": f"document number {i}"}) for i in range(5)]
    corpus.write_text("\n".join(good + ['{"_id": "d5", "text": 7}']) + "\n")  # line 6: in rank 1's half
    proc = _torchrun(tmp_path, "encode", "--model", "splade-tiny", "--input", str(corpus), "--kind", "corpus",
                     "--output", str(tmp_path / "v.jsonl"))
    assert proc.returncode != 0
    assert f"{corpus}:6" in proc.stderr  # rank 1's own error
    assert "rank 1 of 2 failed" in proc.stderr  # rank 0 names the rank
    assert not (tmp_path / "v.jsonl").exists() and not list(tmp_path.glob(".v.jsonl*"))


def test_sharded_evaluate_equals_single_process(tmp_path, monkeypatch):
    beir = write_beir(tmp_path / "beir")
    args = ["evaluate", "--model", "splade-tiny", "--data", str(beir), "--batch-size", "4"]
    proc = _torchrun(tmp_path, *args, "--output", str(tmp_path / "two.json"), "--trec-run", str(tmp_path / "two.run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _single(monkeypatch, *args, "--output", str(tmp_path / "one.json"), "--trec-run", str(tmp_path / "one.run"))
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["world_size"] == 2 and two["docs_per_rank"] == [5, 5]
    assert "world_size" not in one and "docs_per_rank" not in one  # a single process writes what it always did
    assert {k: two["metrics"][k] for k in QUALITY} == pytest.approx({k: one["metrics"][k] for k in QUALITY},
                                                                   abs=1e-9)
    run_two, run_one = _run_lines(tmp_path / "two.run"), _run_lines(tmp_path / "one.run")
    assert [r[:3] for r in run_two] == [r[:3] for r in run_one] and len(run_one) > 0
    assert [r[3] for r in run_two] == pytest.approx([r[3] for r in run_one], rel=1e-5, abs=1e-5)  # as above

    # every rank writes its shard to disk, rank 0 concatenates them there and retrieves memory-mapped: the same
    proc = _torchrun(tmp_path, *args, "--index-dir", str(tmp_path / "index"), "--trec-run", str(tmp_path / "disk.run"),
                     "--output", str(tmp_path / "disk.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_disk = _run_lines(tmp_path / "disk.run")
    assert [r[:3] for r in run_disk] == [r[:3] for r in run_one]
    assert [r[3] for r in run_disk] == pytest.approx([r[3] for r in run_one], rel=1e-5, abs=1e-5)
    assert json.loads((tmp_path / "disk.json").read_text())["docs_per_rank"] == [5, 5]
    index = tmp_path / "index"
    assert sorted(p.name for p in index.iterdir()) == ["docs", "postings"]  # the ranks' parts merged, then gone
    from splade_obs.csr_store import open_csr

    assert open_csr(index / "docs").shape[0] == 10 and (index / "postings" / "meta.json").exists()


def test_sharded_mine_negatives_equals_single_process(tmp_path, monkeypatch):
    beir = write_beir(tmp_path / "beir", split="train")
    args = ["mine-negatives", "--data", str(beir), "--method", "hybrid", "--teacher-scores", "--title-queries",
            "--num-negatives", "3", "--batch-size", "4"]
    proc = _torchrun(tmp_path, *args, "--output", str(tmp_path / "two.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks encoded 5, 5 documents" in proc.stderr
    _single(monkeypatch, *args, "--output", str(tmp_path / "one.jsonl"))
    two, one = read_jsonl(tmp_path / "two.jsonl"), read_jsonl(tmp_path / "one.jsonl")
    assert len(one) > 0
    strip = lambda recs: [{k: v for k, v in r.items() if k != "scores"} for r in recs]
    assert strip(two) == strip(one)
    for a, b in zip(two, one):
        assert a["scores"] == pytest.approx(b["scores"], abs=2e-4)  # rounded to 4 decimals
