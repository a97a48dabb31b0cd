"""`splade-obs encode`: sparse JSONL format, top-k pruning, integer quantisation, typed input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from splade_obs_cli.main import cli
from splade_obs.errors import EXIT_CODES, ErrorCategory

from tests._eval_utils import DOCS, QUERIES, read_jsonl, write_beir


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory):
    return write_beir(tmp_path_factory.mktemp("beir"))


@pytest.fixture(scope="module")
def reference(beir_dir):
    """The encoder's own vectors for the corpus (length 32), to check the JSONL against."""
    from splade_obs.beir import beir_doc_text
    from splade_obs.model import SpladeEncoder

    enc = SpladeEncoder.from_pretrained("splade-tiny")
    texts = [beir_doc_text({"title": t, "text": x}) for t, x in DOCS.values()]
    matrix = enc.encode(texts, max_length=32, batch_size=4)  # same batches as the CLI runs
    terms = enc.tokenizer.convert_ids_to_tokens(list(range(enc.vocab_size)))
    return [{terms[j]: float(w) for j, w in zip(matrix[i].indices, matrix[i].data)} for i in range(len(texts))]


def _run(args: list[str]):
    return CliRunner().invoke(cli, ["encode", "--model", "splade-tiny", "--batch-size", "4", *args])


def test_corpus_to_sparse_jsonl_matches_the_encoder(beir_dir, reference, tmp_path) -> None:
    out = tmp_path / "docs.jsonl"
    result = _run(["--input", str(beir_dir), "--kind", "corpus", "--output", str(out), "--max-length", "32"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == list(DOCS)  # input order
    assert all(set(r) == {"id", "vector"} for r in rows)
    for row, ref in zip(rows, reference):
        assert row["vector"].keys() == ref.keys()
        for term, weight in row["vector"].items():
            assert weight == pytest.approx(ref[term], rel=1e-5)
        weights = list(row["vector"].values())
        assert weights == sorted(weights, reverse=True)  # heaviest first
    assert "encoded 10 corpus records" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # no temporary file left behind


def test_top_k_keeps_the_heaviest_terms(beir_dir, reference, tmp_path) -> None:
    out = tmp_path / "docs.jsonl"
    result = _run(["--input", str(beir_dir), "--kind", "corpus", "--output", str(out), "--max-length", "32",
                   "--top-k", "5"])
    assert result.exit_code == 0, result.output
    for row, ref in zip(read_jsonl(out), reference):
        assert len(row["vector"]) == min(5, len(ref))
        heaviest = sorted(ref.values(), reverse=True)[:5]
        assert sorted(row["vector"].values(), reverse=True) == pytest.approx(heaviest, rel=1e-5)


def test_quantize_scale_writes_positive_integers(beir_dir, reference, tmp_path) -> None:
    out = tmp_path / "docs.jsonl"
    result = _run(["--input", str(beir_dir), "--kind", "corpus", "--output", str(out), "--max-length", "32",
                   "--quantize-scale", "100"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    rows = read_jsonl(out)
    for row, ref in zip(rows, reference):
        for term, value in row["vector"].items():
            assert isinstance(value, int) and value > 0
            assert value == math.floor(ref[term] * 100 + 0.5)
        dropped = {t for t, w in ref.items() if math.floor(w * 100 + 0.5) == 0}
        assert not dropped & row["vector"].keys()
    assert text.count('"vector"') == len(DOCS)


def test_queries_from_a_plain_jsonl_file(tmp_path) -> None:
    src = tmp_path / "queries.jsonl"
    src.write_text("".join(json.dumps({"id": qid, "text": text}) + "\n" for qid, text in QUERIES.items()))
    out = tmp_path / "q.jsonl"
    result = _run(["--input", str(src), "--kind", "queries", "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == list(QUERIES)
    assert all(r["vector"] and all(w > 0 for w in r["vector"].values()) for r in rows)
    coffee = rows[0]["vector"]
    assert "coffee" in coffee  # the query's own salient word carries weight


def test_bad_input_line_is_a_data_error_with_its_place(tmp_path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"id": "a", "text": "fine"}) + "\n" + json.dumps({"id": "b"}) + "\n")
    out = tmp_path / "o.jsonl"
    result = _run(["--input", str(src), "--kind", "queries", "--output", str(out)])
    assert result.exit_code == EXIT_CODES[ErrorCategory.DATA_ERROR], result.output
    assert f"{src}:2" in result.stderr and '"text"' in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no output, no temporary file

    missing = _run(["--input", str(tmp_path / "none.jsonl"), "--kind", "queries", "--output", str(out)])
    assert missing.exit_code == EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR]


def test_row_vector_quantisation_rounds_half_up() -> None:
    from splade_obs.encoding import row_vector

    terms = ["a", "b", "c", "d"]
    vec = row_vector(np.array([0, 1, 2, 3]), np.array([0.125, 0.004, 0.005, 1.0], dtype=np.float64), terms, 100)
    assert vec == {"d": 100, "a": 13, "c": 1}
