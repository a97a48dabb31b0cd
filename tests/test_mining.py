"""Hard-negative mining: positives never come back as negatives, counts are as asked, output is training data."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from cli.main import cli
from splade_obs.data import beir_doc_text, load_beir, load_training_data
from splade_obs.errors import EXIT_CODES, DependencyError, ErrorCategory
from splade_obs.mining import mine_negatives
from tests._eval_utils import DOCS, QRELS, read_jsonl, write_beir

POSITIVES = {}
for _qid, _did, _rel in QRELS:
    POSITIVES.setdefault(_qid, set()).add(_did)


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    return load_beir(write_beir(tmp_path_factory.mktemp("beir"), split="train"), "train")


@pytest.fixture(scope="module")
def encoder():
    from splade_obs.model import SpladeEncoder

    return SpladeEncoder.from_pretrained("splade-tiny")


def _check_records(records: list[dict], num_negatives: int) -> None:
    assert {r["query_id"] for r in records} <= set(POSITIVES)
    for rec in records:
        qid = rec["query_id"]
        assert set(rec["positive_ids"]) == POSITIVES[qid]
        assert not set(rec["negative_ids"]) & POSITIVES[qid], f"{qid}: a known positive was mined as negative"
        assert len(set(rec["negative_ids"])) == len(rec["negative_ids"]) == num_negatives
        assert rec["negatives"] == [beir_doc_text({"title": DOCS[d][0], "text": DOCS[d][1]})
                                    for d in rec["negative_ids"]]
        positive_texts = {beir_doc_text({"title": DOCS[d][0], "text": DOCS[d][1]}) for d in POSITIVES[qid]}
        assert not positive_texts & set(rec["negatives"])


def test_splade_mining_excludes_positives_and_keeps_the_ranking_order(beir, encoder) -> None:
    result = mine_negatives(beir, method="splade", encoder=encoder, num_negatives=3, depth=10,
                            max_query_length=16, max_doc_length=32, batch_size=4)
    assert result.num_queries == 4 and result.num_skipped == 0 and result.num_short == 0
    _check_records(result.records, 3)
    # The negatives are the best-scoring non-positives, in rank order.
    from splade_obs.evaluate import InvertedIndex

    ids = list(beir.corpus)
    docs = encoder.encode([beir_doc_text(beir.corpus[d]) for d in ids], max_length=32, batch_size=4)
    for rec in result.records:
        q = encoder.encode([rec["query"]], max_length=16)
        ranked, _ = InvertedIndex(docs, ids).search(q, 10)
        assert rec["negative_ids"] == [d for d in ranked[0] if d not in POSITIVES[rec["query_id"]]][:3]


def test_shallow_depth_skips_queries_whose_hits_are_all_positive(beir, encoder) -> None:
    result = mine_negatives(beir, method="splade", encoder=encoder, num_negatives=4, depth=1,
                            max_query_length=16, max_doc_length=32, batch_size=4)
    assert result.num_skipped >= 1  # "which planet is the largest" finds Jupiter (its positive) first
    assert result.num_skipped + len(result.records) == 4
    assert all(len(r["negatives"]) == 1 for r in result.records)
    assert result.num_short == len(result.records)


def test_bm25_mining_excludes_positives(beir) -> None:
    pytest.importorskip("bm25s", reason="bm25s is the bench extra")
    result = mine_negatives(beir, method="bm25", num_negatives=2, depth=10)
    assert result.records
    for rec in result.records:
        assert not set(rec["negative_ids"]) & POSITIVES[rec["query_id"]]
        assert 1 <= len(rec["negatives"]) <= 2


def test_bm25_without_the_package_is_a_dependency_error(beir, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bm25s", None)  # fault injection: the import fails
    with pytest.raises(DependencyError) as info:
        mine_negatives(beir, method="bm25", num_negatives=2, depth=10)
    assert "bm25s" in (info.value.hint or "")


def test_mine_negatives_cli_output_loads_as_training_data(tmp_path) -> None:
    data = write_beir(tmp_path / "beir", split="train")
    out = tmp_path / "triples.jsonl"
    result = CliRunner().invoke(cli, ["mine-negatives", "--model", "splade-tiny", "--data", str(data),
                                      "--output", str(out), "--num-negatives", "2", "--depth", "8",
                                      "--max-query-length", "16", "--max-doc-length", "32", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "mined 4 records" in result.stderr
    records = read_jsonl(out)
    _check_records(records, 2)
    loaded = load_training_data(out)
    assert loaded.fmt == "jsonl" and len(loaded.examples) == 4
    for example, rec in zip(loaded.examples, records):
        assert example.query == rec["query"]
        assert list(example.negatives) == rec["negatives"] and len(example.negatives) == 2


def test_mine_negatives_cli_missing_split_is_a_data_error(tmp_path) -> None:
    data = write_beir(tmp_path / "beir", split="test")
    result = CliRunner().invoke(cli, ["mine-negatives", "--data", str(data), "--output", str(tmp_path / "o.jsonl")])
    assert result.exit_code == EXIT_CODES[ErrorCategory.DATA_ERROR]
    assert "error[DATA_ERROR]" in result.stderr and "qrels/train.tsv" in result.stderr
