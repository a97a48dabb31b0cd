"""Retrieval evaluation: metrics against hand-computed values and trec_eval (pytrec_eval), the exact index,
the evaluate CLI."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from splade_obs.errors import EXIT_CODES, DataError, ErrorCategory, EvaluationError
from splade_obs.evaluation import (
    InvertedIndex,
    RetrievalEvaluator,
    compute_metrics,
    idf_reweight,
    idf_weights,
    map_at_k,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    run_from_search,
    sparsity_metrics,
    write_trec_run,
)

from tests._eval_utils import write_beir

L2 = math.log2


# ----------------------------------------------------------------------------------------- hand-computed
def test_binary_metrics_match_hand_computation() -> None:
    qrels = {"q1": {"d1": 1, "d3": 1}, "q2": {"d2": 1}}
    run = {"q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7}, "q2": {"d1": 0.5, "d3": 0.4}}
    # q1: hits at ranks 1 and 3; q2: its only relevant document is not retrieved -> 0 everywhere.
    ndcg_q1 = (1 + 1 / L2(4)) / (1 + 1 / L2(3))
    assert ndcg_at_k(run, qrels, 10) == pytest.approx(ndcg_q1 / 2)
    assert mrr_at_k(run, qrels, 10) == pytest.approx(1.0 / 2)
    assert recall_at_k(run, qrels, 100) == pytest.approx(1.0 / 2)
    assert map_at_k(run, qrels, 100) == pytest.approx((1 + 2 / 3) / 2 / 2)
    # Cut-offs: at k=2 the second relevant document of q1 is out of reach.
    assert recall_at_k(run, qrels, 2) == pytest.approx(0.5 / 2)
    assert map_at_k(run, qrels, 2) == pytest.approx(0.5 / 2)
    assert ndcg_at_k(run, qrels, 1) == pytest.approx(1.0 / 2)


def test_graded_ndcg_uses_the_label_as_gain() -> None:
    qrels = {"q": {"a": 2, "b": 1, "z": 0}}
    run = {"q": {"z": 0.95, "b": 0.9, "a": 0.8, "c": 0.7}}
    dcg = 0 + 1 / L2(3) + 2 / L2(4)
    idcg = 2 / L2(2) + 1 / L2(3)
    assert ndcg_at_k(run, qrels, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(run, qrels, 2) == pytest.approx((1 / L2(3)) / idcg)
    assert mrr_at_k(run, qrels, 10) == pytest.approx(1 / 2)  # label 0 is not relevant
    assert map_at_k(run, qrels, 100) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_queries_without_relevant_documents_are_left_out_and_missing_queries_score_zero() -> None:
    qrels = {"q1": {"d1": 1}, "q_none": {"d2": 0}, "q_missing": {"d3": 1}}
    run = {"q1": {"d1": 1.0}, "q_none": {"d2": 1.0}}
    metrics = compute_metrics(run, qrels)
    assert set(metrics) == {"ndcg@10", "mrr@10", "recall@100", "map@100"}
    for value in metrics.values():
        assert value == pytest.approx(0.5)  # q1 perfect, q_missing zero, q_none not counted


def test_ties_are_broken_by_document_id() -> None:
    qrels = {"q": {"y": 1}}
    assert mrr_at_k({"q": {"y": 1.0, "x": 1.0}}, qrels) == pytest.approx(0.5)
    assert mrr_at_k({"q": {"y": 1.0, "z": 1.0}}, qrels) == pytest.approx(1.0)


def test_compute_metrics_rejects_qrels_without_any_relevant_document() -> None:
    with pytest.raises(DataError):
        compute_metrics({"q": {"d": 1.0}}, {"q": {"d": 0}})


# ----------------------------------------------------------------------------------- vs trec_eval
def _random_case(seed: int, graded: bool) -> tuple[dict, dict]:
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(150)]
    qrels, run = {}, {}
    for q in range(40):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(1, 12))
        rels = {d: (rng.randint(0, 3) if graded else rng.randint(0, 1)) for d in judged}
        rels[judged[0]] = max(1, rels[judged[0]])  # at least one relevant document per query
        qrels[qid] = rels
        if q % 13 == 12:
            continue  # a query missing from the run scores 0
        retrieved = rng.sample(docs, rng.randint(1, 130))
        # Unique scores: trec_eval and we may break ties differently.
        scores = rng.sample(range(10_000), len(retrieved))
        run[qid] = {d: s / 10_000 for d, s in zip(retrieved, scores)}
    return run, qrels


def _trec_eval(run: dict, qrels: dict, measure: str, k: int) -> float:
    """One metric from pytrec_eval (trec_eval's own C code), averaged over every query of the qrels."""
    pytrec_eval = pytest.importorskip("pytrec_eval", reason="pytrec_eval is the reference implementation (test extra)")
    if measure == "recip_rank":  # trec_eval's reciprocal rank has no cut-off: give it the top k only
        run = {q: dict(sorted(r.items(), key=lambda x: -x[1])[:k]) for q, r in run.items()}
        name, key = "recip_rank", "recip_rank"
    else:
        name, key = f"{measure}.{k}", f"{measure}_{k}"
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {name}).evaluate(run)
    return sum(per_query[q][key] if q in per_query else 0.0 for q in qrels) / len(qrels)


@pytest.mark.parametrize("graded", [False, True])
def test_metrics_match_trec_eval_on_random_runs(graded: bool) -> None:
    for seed in range(3):
        run, qrels = _random_case(seed, graded)
        ours = {**compute_metrics(run, qrels), "ndcg@5": ndcg_at_k(run, qrels, 5),
                "recall@10": recall_at_k(run, qrels, 10), "map@10": map_at_k(run, qrels, 10),
                "mrr@3": mrr_at_k(run, qrels, 3)}
        measures = {"ndcg": "ndcg_cut", "recall": "recall", "map": "map_cut", "mrr": "recip_rank"}
        assert {key.split("@")[0] for key in ours} >= set(measures)
        for key, value in ours.items():
            name, k = key.split("@")
            if name in measures:
                assert value == pytest.approx(_trec_eval(run, qrels, measures[name], int(k)), abs=1e-9), (seed, key)


# ----------------------------------------------------------------------------------------- the index
def _random_sparse(rows: int, cols: int, density: float, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    m = sp.random(rows, cols, density=density, format="csr", random_state=rng, dtype=np.float32)
    # Small integer weights: sums are exact in float32, and many scores tie.
    m.data = rng.integers(1, 4, size=m.nnz).astype(np.float32)
    return m


def _brute_force(q: sp.csr_matrix, d: sp.csr_matrix, k: int) -> list[list[int]]:
    dense = q.toarray().astype(np.float64) @ d.toarray().astype(np.float64).T
    out = []
    for row in dense:
        ranked = sorted((i for i in range(len(row)) if row[i] > 0), key=lambda i: (-row[i], i))
        out.append(ranked[:k])
    return out


@pytest.mark.parametrize("k", [1, 5, 37, 500])
def test_inverted_index_equals_brute_force_dense_ranking(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import splade_obs.evaluation as ev

    monkeypatch.setattr(ev, "MAX_BLOCK_ELEMENTS", 7 * 300)  # force several query chunks
    docs = _random_sparse(300, 200, 0.05, seed=k)
    queries = _random_sparse(25, 200, 0.08, seed=100 + k)
    index = InvertedIndex(docs, [f"doc{i}" for i in range(300)])
    positions, values = index.search_positions(queries, k)
    expected = _brute_force(queries, docs, k)
    dense = queries.toarray() @ docs.toarray().T
    ties_at_cut = 0
    for r, (got, want) in enumerate(zip(positions, expected)):
        assert got.tolist() == want, f"query {r}"
        np.testing.assert_allclose(values[r], dense[r, want])
        if len(want) == k and k < 300 and np.count_nonzero(dense[r] == dense[r, want[-1]]) > 1:
            ties_at_cut += 1
    ids, _ = index.search(queries, k)
    assert ids[0] == [f"doc{i}" for i in expected[0]]
    if 1 < k < 300:
        assert ties_at_cut > 0, "the data should exercise ties at the cut-off"


def test_index_rejects_wrong_dimension() -> None:
    index = InvertedIndex(_random_sparse(5, 10, 0.5, 0))
    with pytest.raises(Exception, match="dimensions"):
        index.search(_random_sparse(2, 11, 0.5, 1), 3)


def test_idf_weights_follow_bm25s_idf_on_the_document_vectors() -> None:
    d = sp.csr_matrix(np.array([[1.0, 0.5, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0],
                                [0.7, 0.2, 0.4, 0.0]], dtype=np.float32))
    df = np.array([4, 2, 1, 0])
    idf = np.log(1 + (4 - df + 0.5) / (df + 0.5))
    np.testing.assert_allclose(idf_weights(d, 1.0), idf, rtol=1e-12)
    np.testing.assert_allclose(idf_weights(d, 0.5), np.sqrt(idf), rtol=1e-12)
    assert np.all(idf_weights(d, 0.0) == 1.0)
    assert idf[0] > 0, "a term in every document keeps a small positive weight"
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(EvaluationError, match="idf power"):
            idf_weights(d, bad)


@pytest.mark.parametrize("power", [0.0, 0.4, 1.0])
def test_idf_weighted_index_equals_query_side_weighting_and_brute_force(power: float) -> None:
    docs = _random_sparse(200, 60, 0.1, seed=5)
    queries = _random_sparse(12, 60, 0.15, seed=6)
    df = np.asarray((docs != 0).sum(axis=0)).ravel()
    w = np.log1p((200 - df + 0.5) / (df + 0.5)) ** power
    weighted = idf_reweight(docs, power)
    assert weighted.nnz == docs.nnz and weighted.dtype == docs.dtype
    index = InvertedIndex(weighted)
    expected = queries.toarray() @ np.diag(w) @ docs.toarray().T
    np.testing.assert_allclose(index.scores(queries), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(index.scores(queries), (queries @ sp.diags(w)).toarray() @ docs.toarray().T,
                               rtol=1e-5, atol=1e-6)
    if power == 0:
        np.testing.assert_array_equal(weighted.toarray(), docs.toarray())


def test_idf_weighting_lets_a_rare_term_outrank_a_common_one() -> None:
    # term 0 is in every document, term 1 in one: without idf the document heavy in the common term wins
    docs = sp.csr_matrix(np.array([[3.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 2.0]], dtype=np.float32))
    query = sp.csr_matrix(np.array([[1.0, 1.0]], dtype=np.float32))
    assert InvertedIndex(docs).search_positions(query, 1)[0][0].tolist() == [0]
    assert InvertedIndex(idf_reweight(docs, 1.0)).search_positions(query, 1)[0][0].tolist() == [3]


def test_sparsity_metrics() -> None:
    q = sp.csr_matrix(np.array([[1, 0, 2, 0], [0, 0, 3, 0]], dtype=np.float32))
    d = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0]], dtype=np.float32))
    s = sparsity_metrics(q, d)
    assert s["query_nnz"] == pytest.approx(1.5)
    assert s["doc_nnz"] == pytest.approx(5 / 3)
    # term 0: p_q=1/2, p_d=1/3; term 2: p_q=1, p_d=2/3
    assert s["retrieval_flops"] == pytest.approx(0.5 / 3 + 2 / 3)
    assert s["num_docs"] == 3
    assert s["index_size_mb"] == pytest.approx((5 * 8 + 5 * 4) / 1e6)


def test_trec_run_format(tmp_path) -> None:
    run = run_from_search(["q2", "q1"], [["a", "b"], ["c"]], [np.array([2.0, 1.5]), np.array([0.25])])
    path = write_trec_run(run, tmp_path / "sub" / "run.trec", tag="t")
    lines = path.read_text().splitlines()
    assert lines == ["q1 Q0 c 1 0.250000 t", "q2 Q0 a 1 2.000000 t", "q2 Q0 b 2 1.500000 t"]


# ----------------------------------------------------------------------------------------- with the model
@pytest.fixture(scope="module")
def encoder():
    from splade_obs.model import SpladeEncoder

    return SpladeEncoder.from_pretrained("splade-tiny")


def test_evaluator_restores_training_mode_and_subsets_queries(tmp_path, encoder) -> None:
    from splade_obs.beir import load_beir

    beir = load_beir(write_beir(tmp_path / "beir"), "test")
    evaluator = RetrievalEvaluator(beir, max_query_length=16, max_doc_length=32, batch_size=4, max_queries=2,
                                   seed=3)
    encoder.train()
    metrics = evaluator.evaluate(encoder)
    assert encoder.training, "evaluate() must restore the previous train/eval mode"
    assert metrics["num_queries"] == 2 and len(evaluator.run()) == 2
    again = RetrievalEvaluator(beir, max_query_length=16, max_doc_length=32, max_queries=2, seed=3)
    assert again.query_ids == evaluator.query_ids  # same seed -> same subset
    assert metrics["num_docs"] == 10
    for key in ("encode_docs_s", "encode_queries_s", "search_s", "query_nnz", "doc_nnz", "retrieval_flops"):
        assert metrics[key] > 0
    # The run holds the real index scores: recompute one from the vectors.
    q = encoder.encode([beir.queries[evaluator.query_ids[0]]], max_length=16)
    docs = encoder.encode(evaluator.doc_texts, max_length=32)
    best_doc, best_score = max(evaluator.run()[evaluator.query_ids[0]].items(), key=lambda kv: kv[1])
    assert best_score == pytest.approx(float((q @ docs.T).toarray().max()), rel=1e-5)
    assert evaluator.doc_ids[int((q @ docs.T).toarray().argmax())] == best_doc


def test_evaluator_with_idf_power_scores_with_the_weighted_index(tmp_path, encoder) -> None:
    from splade_obs.beir import load_beir

    beir = load_beir(write_beir(tmp_path / "beir"), "test")
    evaluator = RetrievalEvaluator(beir, max_query_length=16, max_doc_length=32, idf_power=0.5)
    metrics = evaluator.evaluate(encoder)
    docs = encoder.encode(evaluator.doc_texts, max_length=32)
    queries = encoder.encode(evaluator.query_texts, max_length=16)
    dense = (queries @ idf_reweight(docs, 0.5).T).toarray()
    plain = (queries @ docs.T).toarray()
    for r, qid in enumerate(evaluator.query_ids):
        got = evaluator.run()[qid]
        for docid, score in got.items():
            assert score == pytest.approx(float(dense[r, evaluator.doc_ids.index(docid)]), rel=1e-5)
    assert not np.allclose(dense, plain), "the weighting changes the scores"
    plain_nnz = RetrievalEvaluator(beir, max_query_length=16, max_doc_length=32).evaluate(encoder)["doc_nnz"]
    assert metrics["doc_nnz"] == plain_nnz, "sparsity is the model's own, not the index weighting's"
    with pytest.raises(EvaluationError, match="idf power"):
        RetrievalEvaluator(beir, idf_power=-1.0)


def test_evaluate_cli_on_a_small_beir_folder(tmp_path) -> None:
    from splade_obs_cli.main import cli

    data = write_beir(tmp_path / "beir")
    out, trec = tmp_path / "m" / "metrics.json", tmp_path / "run.trec"
    result = CliRunner().invoke(cli, ["evaluate", "--model", "splade-tiny", "--data", str(data), "--split", "test",
                                           "--max-query-length", "16", "--max-doc-length", "32",
                                           "--batch-size", "4", "--output", str(out), "--trec-run", str(trec),
                                           "--top-k-docs", "5"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    metrics = payload["metrics"]
    for key in ("ndcg@10", "mrr@10", "recall@100", "map@100"):
        assert 0.0 <= metrics[key] <= 1.0
    for key in ("query_nnz", "doc_nnz", "retrieval_flops", "index_size_mb", "num_docs", "encode_docs_s"):
        assert key in metrics
    assert metrics["num_queries"] == 4
    assert metrics["mrr@10"] > 0.5, "a real model finds the obvious matches of this toy corpus"
    assert json.loads(out.read_text()) == payload
    assert payload["idf_power"] == 0.0
    assert "ndcg@10" in result.stderr  # the console table goes to stderr
    rows = [line.split() for line in trec.read_text().splitlines()]
    assert rows and all(len(r) == 6 and r[1] == "Q0" and r[5] == "splade-obs" for r in rows)
    for qid in ("q1", "q2", "q3", "q4"):
        ranks = [int(r[3]) for r in rows if r[0] == qid]
        scores = [float(r[4]) for r in rows if r[0] == qid]
        assert ranks == list(range(1, len(ranks) + 1)) and 0 < len(ranks) <= 5
        assert scores == sorted(scores, reverse=True)


def test_evaluate_cli_idf_power_scores_like_the_weighted_evaluator(tmp_path, encoder) -> None:
    from splade_obs_cli.main import cli
    from splade_obs.beir import load_beir

    data = write_beir(tmp_path / "beir")
    trec = tmp_path / "run.trec"
    result = CliRunner().invoke(cli, ["evaluate", "--model", "splade-tiny", "--data", str(data),
                                      "--max-query-length", "16", "--max-doc-length", "32", "--idf-power", "0.5",
                                      "--trec-run", str(trec)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["idf_power"] == 0.5
    evaluator = RetrievalEvaluator(load_beir(data, "test"), max_query_length=16, max_doc_length=32, idf_power=0.5)
    evaluator.evaluate(encoder)
    rows = [line.split() for line in trec.read_text().splitlines()]
    assert len(rows) == sum(len(v) for v in evaluator.run().values())
    for qid, _, docid, _, score, _ in rows:
        assert float(score) == pytest.approx(evaluator.run()[qid][docid], abs=2e-6)
    bad = CliRunner().invoke(cli, ["evaluate", "--model", "splade-tiny", "--data", str(data), "--idf-power", "-1"])
    assert bad.exit_code == 2 and "--idf-power" in bad.stderr


def test_evaluate_cli_typed_errors(tmp_path) -> None:
    from splade_obs_cli.main import cli

    runner = CliRunner()
    missing = runner.invoke(cli, ["evaluate", "--model", "splade-tiny", "--data", str(tmp_path / "nope")])
    assert missing.exit_code == EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR]
    assert "error[FILE_SYSTEM_ERROR]" in missing.stderr and "Traceback" not in missing.stderr

    data = write_beir(tmp_path / "beir")
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\n")
    broken = runner.invoke(cli, ["evaluate", "--model", "splade-tiny", "--data", str(data)])
    assert broken.exit_code == EXIT_CODES[ErrorCategory.DATA_ERROR]
    assert "error[DATA_ERROR]" in broken.stderr and "test.tsv:2" in broken.stderr
    assert "Traceback" not in broken.stderr
    debug = runner.invoke(cli, ["--debug", "evaluate", "--model", "splade-tiny", "--data", str(data)])
    assert debug.exit_code == broken.exit_code and "Traceback" in debug.stderr


def test_ndcg_per_query_is_what_ndcg_at_k_averages() -> None:
    from splade_obs.evaluation import ndcg_at_k, ndcg_per_query

    qrels = {"q1": {"a": 2, "b": 1}, "q2": {"c": 1}, "q3": {"d": 0}}  # q3 has no relevant document: not judged
    run = {"q1": {"b": 3.0, "a": 2.0, "x": 1.0}, "q3": {"d": 1.0}}   # q2 missing: it scores 0
    per = ndcg_per_query(run, qrels)
    ideal = 2 + 1 / math.log2(3)
    assert per == pytest.approx({"q1": (1 + 2 / math.log2(3)) / ideal, "q2": 0.0})
    assert ndcg_at_k(run, qrels) == pytest.approx(sum(per.values()) / 2)


def test_paired_comparison_separates_a_real_gain_from_noise() -> None:
    from splade_obs.significance import paired_comparison

    rng = np.random.default_rng(3)
    base = {f"q{i}": float(x) for i, x in enumerate(rng.random(200))}
    better = {q: v + 0.05 for q, v in base.items()}             # every query gains 0.05
    gain = paired_comparison(better, base)
    assert gain["mean_diff"] == pytest.approx(0.05) and gain["p_value"] < 0.001
    assert gain["ci95_low"] == pytest.approx(0.05) and gain["ci95_high"] == pytest.approx(0.05)
    same = paired_comparison(base, dict(base))
    assert same["p_value"] == 1.0 and same["mean_diff"] == 0.0
    # zero-mean noise: the interval straddles 0 and the test does not call it a difference
    centred = {q: v + e for (q, v), e in zip(base.items(), _centred_noise(rng, 200))}
    noise = paired_comparison(centred, base)
    assert noise["ci95_low"] < 0 < noise["ci95_high"] and noise["p_value"] > 0.5
    # a swap of the two sides flips the sign and keeps the p-value
    assert paired_comparison(base, better)["mean_diff"] == pytest.approx(-0.05)
    with pytest.raises(EvaluationError):
        paired_comparison(base, {"q0": 1.0, "q1": 0.5})


def _centred_noise(rng: np.random.Generator, n: int) -> list[float]:
    e = rng.normal(0, 0.1, n)
    return [float(x) for x in e - e.mean()]


def test_evaluate_cli_head_pass_flag_gives_the_same_metrics_and_is_recorded(tmp_path, monkeypatch) -> None:
    """--head-pass fp32 / bf16 / int8: the pass named is the one that ran (recorded in the JSON), and the run
    file and metrics are the same whichever computed the vocabulary max."""
    from splade_obs import cpu
    from splade_obs import model as model_module
    from splade_obs_cli.main import cli

    data = write_beir(tmp_path / "beir")
    used: list[str] = []
    for fn, name in (("_max_per_document_int8", "int8"), ("_max_per_document_prefiltered", "bf16"),
                     ("_max_per_document", "fp32")):
        real = getattr(model_module, fn)
        monkeypatch.setattr(model_module, fn, lambda *a, _r=real, _n=name: used.append(_n) or _r(*a))
    passes = ["fp32", "bf16"] + (["int8"] if cpu.int8_matmul_works() else [])
    runs, metrics = {}, {}
    try:
        for name in passes:
            used.clear()
            trec = tmp_path / f"{name}.trec"
            result = CliRunner().invoke(cli, ["evaluate", "--model", "splade-tiny", "--data", str(data),
                                              "--max-query-length", "16", "--max-doc-length", "32",
                                              "--head-pass", name, "--trec-run", str(trec)])
            assert result.exit_code == 0, result.output
            payload = json.loads(result.stdout)
            assert payload["head_pass"] == name and set(used) == {name}, (name, set(used))
            metrics[name] = {k: payload["metrics"][k] for k in ("ndcg@10", "mrr@10", "recall@100", "doc_nnz")}
            runs[name] = [line.split()[:4] for line in trec.read_text().splitlines()]  # qid Q0 doc rank
    finally:
        cpu.set_head_pass(None)
    assert all(metrics[n] == metrics["fp32"] and runs[n] == runs["fp32"] for n in passes), metrics
    bad = CliRunner().invoke(cli, ["evaluate", "--model", "splade-tiny", "--data", str(data), "--head-pass", "fp8"])
    assert bad.exit_code == 2 and "--head-pass" in bad.stderr
