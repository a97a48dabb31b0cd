"""Hard-negative mining: positives never come back as negatives, counts are as asked, output is training data."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from splade_obs_cli.main import cli
from splade_obs.beir import beir_doc_text, load_beir
from splade_obs.data import load_training_data
from splade_obs.errors import EXIT_CODES, ConfigError, DependencyError, ErrorCategory
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
    from splade_obs.evaluation import InvertedIndex

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


# ----------------------------------------------------------------------------- teacher scores, hybrid, titles
def _bm25_rows(texts: list[str], queries: list[str], stemmer):
    """Every document's BM25 score per query, straight from bm25s (the reference for the miner's scores)."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
    return [retriever.get_scores(list(t)) for t in tokens]


def test_hybrid_teacher_scores_follow_the_fusion_formula(beir, encoder) -> None:
    pytest.importorskip("bm25s", reason="bm25s is in the test extra")
    Stemmer = pytest.importorskip("Stemmer", reason="PyStemmer is in the test extra")
    stemmer = Stemmer.Stemmer("english")
    result = mine_negatives(beir, method="hybrid", encoder=encoder, num_negatives=3, depth=6,
                            max_query_length=16, max_doc_length=32, batch_size=4, teacher_scores=True,
                            bm25_weight=0.3, stemmer=stemmer)
    # One record per (query, positive): 7 qrels lines, every query keeps negatives at depth 6.
    assert len(result.records) == sum(len(p) for p in POSITIVES.values()) == 7
    ids = list(beir.corpus)
    texts = [beir_doc_text(beir.corpus[d]) for d in ids]
    docs = encoder.encode(texts, max_length=32, batch_size=4)
    qids = [q for q in beir.queries if q in POSITIVES]
    queries = [beir.queries[q] for q in qids]
    splade = (encoder.encode(queries, max_length=16) @ docs.T).toarray()
    bm25 = _bm25_rows(texts, queries, stemmer)
    scale = float(splade.max(axis=1).mean())
    assert result.teacher_scale == pytest.approx(scale, rel=1e-6)
    for rec in result.records:
        i = qids.index(rec["query_id"])
        assert len(rec["positive_ids"]) == 1 and rec["positive_ids"][0] in POSITIVES[rec["query_id"]]
        assert not set(rec["negative_ids"]) & POSITIVES[rec["query_id"]]
        expected = [scale * (0.3 * bm25[i][ids.index(d)] / bm25[i].max()
                             + 0.7 * splade[i, ids.index(d)] / splade[i].max())
                    for d in rec["positive_ids"] + rec["negative_ids"]]
        assert rec["scores"] == pytest.approx(expected, abs=1e-3)
        # without --sample the negatives are the best fused non-positives, in order
        assert rec["scores"][1:] == sorted(rec["scores"][1:], reverse=True)


def test_sampled_negatives_come_from_the_top_depth_and_repeat_with_the_seed(beir, encoder) -> None:
    kwargs = dict(method="splade", encoder=encoder, num_negatives=2, depth=6, max_query_length=16,
                  max_doc_length=32, batch_size=4)
    top = {r["query_id"]: r["negative_ids"] for r in mine_negatives(beir, **{**kwargs, "num_negatives": 6}).records}
    first = mine_negatives(beir, **kwargs, sample=True, seed=1).records
    again = mine_negatives(beir, **kwargs, sample=True, seed=1).records
    assert [r["negative_ids"] for r in first] == [r["negative_ids"] for r in again]
    seeds = [[r["negative_ids"] for r in mine_negatives(beir, **kwargs, sample=True, seed=s).records]
             for s in range(2, 8)]
    assert any(s != [r["negative_ids"] for r in first] for s in seeds), "the seed does not change the draw"
    for rec in first:
        assert set(rec["negative_ids"]) <= set(top[rec["query_id"]]) and len(rec["negative_ids"]) == 2


def test_title_queries_pair_each_title_with_its_own_text(beir, encoder) -> None:
    result = mine_negatives(beir, method="splade", encoder=encoder, num_negatives=2, depth=5, max_query_length=16,
                            max_doc_length=32, batch_size=4, teacher_scores=True, title_queries=True)
    titled = [r for r in result.records if r["query_id"].startswith("title:")]
    # a title whose words match no other text has no negative and is skipped (counted)
    assert result.num_title_queries == len(titled) and len(titled) + result.num_skipped == len(DOCS)
    assert len(titled) >= 7
    for rec in titled:
        doc = rec["query_id"].removeprefix("title:")
        assert rec["query"] == DOCS[doc][0] and rec["positive_ids"] == [doc]
        assert rec["positives"] == [DOCS[doc][1]]  # the text alone: the title is the query
        assert doc not in rec["negative_ids"] and all(n in DOCS for n in rec["negative_ids"])
        assert rec["negatives"] == [DOCS[n][1] for n in rec["negative_ids"]]
        assert 1 <= len(rec["negatives"]) <= 2 and len(rec["scores"]) == 1 + len(rec["negatives"])
        assert rec["scores"][0] > 0  # the title scores its own text (the titles' words recur in their texts)
    # the title queries come on top of the qrels' queries, which are unchanged
    assert len(result.records) - len(titled) == 7


def test_title_queries_share_the_labelled_queries_teacher_scale(beir, encoder) -> None:
    """One file, one unit: the hybrid title records are scaled by the labelled queries' mean top SPLADE score
    (a fused score is at most 1 before scaling, so no title score can exceed that scale)."""
    pytest.importorskip("bm25s", reason="bm25s is in the test extra")
    kwargs = dict(method="hybrid", encoder=encoder, num_negatives=2, depth=5, max_query_length=16,
                  max_doc_length=32, batch_size=4, teacher_scores=True)
    plain = mine_negatives(beir, **kwargs)
    titled = mine_negatives(beir, **kwargs, title_queries=True)
    assert titled.teacher_scale == pytest.approx(plain.teacher_scale)
    title_scores = [s for r in titled.records if r["query_id"].startswith("title:") for s in r["scores"]]
    assert title_scores and max(title_scores) <= titled.teacher_scale + 1e-3
    # titles match their own texts almost word for word: a title query's positive gets near the full scale
    assert max(title_scores) >= 0.9 * titled.teacher_scale


def test_unknown_stemmer_and_missing_pystemmer_are_typed_errors(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from splade_obs.mining import make_stemmer

    pytest.importorskip("Stemmer", reason="PyStemmer is in the test extra")
    assert make_stemmer("none") is None
    with pytest.raises(ConfigError, match="--stemmer klingon"):  # a flag's value: a config error
        make_stemmer("klingon")
    monkeypatch.setitem(sys.modules, "Stemmer", None)  # fault injection: the import fails
    data = write_beir(tmp_path / "beir", split="train")
    result = CliRunner().invoke(cli, ["mine-negatives", "--method", "bm25", "--data", str(data),
                                      "--output", str(tmp_path / "o.jsonl")])
    assert result.exit_code == EXIT_CODES[ErrorCategory.DEPENDENCY_ERROR]
    assert "PyStemmer" in result.stderr and "Traceback" not in result.stderr


def test_distillation_from_mined_teacher_scores_end_to_end(tmp_path, tiny_cfg) -> None:
    """mine-negatives --teacher-scores through the CLI feeds a pure-MarginMSE run of the real trainer."""
    pytest.importorskip("bm25s", reason="bm25s is in the test extra")
    data = write_beir(tmp_path / "beir", split="train")
    out = tmp_path / "teacher.jsonl"
    result = CliRunner().invoke(cli, ["mine-negatives", "--method", "hybrid", "--data", str(data), "--output",
                                      str(out), "--teacher-scores", "--title-queries", "--num-negatives", "2",
                                      "--depth", "6", "--sample", "--max-query-length", "16",
                                      "--max-doc-length", "32", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    titled = sum(r["query_id"].startswith("title:") for r in records)
    assert titled >= 7 and f"mined {len(records)} records, {titled} from titles (hybrid, depth 6)" in result.stderr
    loaded = load_training_data(out)
    assert all(ex.scores is not None and len(ex.scores) == 1 + len(ex.negatives) for ex in loaded.examples)

    from splade_obs.bus import RecordingSink
    from splade_obs.events import StepDone
    from splade_obs.run import run_training

    rec = RecordingSink()
    cfg = tiny_cfg(data={"train_file": str(out), "num_negatives": 2},
                   loss={"contrastive_weight": 0.0, "distillation": "margin_mse", "lambda_q": 0.0, "lambda_d": 0.0})
    assert run_training(cfg, extra_sinks=[rec]).status == "FINISHED"
    steps = rec.of(StepDone)
    assert len(steps) == 3
    for step in steps:
        assert step.parts["base"] == 0.0 and step.parts["distill"] > 0
        assert step.loss == pytest.approx(step.parts["distill"], rel=1e-5)

    # the same teacher file trains with listwise KL plus MarginMSE; each term reaches the step events
    rec = RecordingSink()
    cfg = tiny_cfg(data={"train_file": str(out), "num_negatives": 2}, checkpoint={"output_dir": str(tmp_path / "kl")},
                   loss={"contrastive_weight": 0.0, "distillation": "kl_margin_mse", "lambda_q": 0.0, "lambda_d": 0.0})
    assert run_training(cfg, extra_sinks=[rec]).status == "FINISHED"
    for step in rec.of(StepDone):
        assert step.parts["distill_kl"] > 0 and step.parts["distill_margin_mse"] > 0
        assert step.loss == pytest.approx(step.parts["distill_kl"] + step.parts["distill_margin_mse"], rel=1e-5)


def test_stopword_only_queries_and_titles_do_not_break_bm25_or_hybrid_mining(tmp_path, encoder) -> None:
    """bm25s scores an empty token list with an IndexError; such a query (or a title like SciFact's "in")
    matches nothing in BM25 and is skipped, or mined from SPLADE alone in the hybrid."""
    pytest.importorskip("bm25s", reason="bm25s is in the test extra")
    data = write_beir(tmp_path / "beir", split="train", qrels=[*QRELS, ("q5", "d3", 1)])
    with open(data / "queries.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"_id": "q5", "text": "it is in the a"}) + "\n")
    with open(data / "corpus.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"_id": "d10", "title": "in", "text": "Lava flows out of a volcano when it erupts."}) + "\n")
    beir = load_beir(data, "train")
    bm25 = mine_negatives(beir, method="bm25", num_negatives=2, depth=5, title_queries=True, teacher_scores=True)
    ids = {r["query_id"] for r in bm25.records}
    assert "q5" not in ids and "title:d10" not in ids and {"q2", "q4"} <= ids  # q1, q3: only positives match
    assert len(ids) + bm25.num_skipped == 5 + 11  # every query and title counted, kept or skipped
    hybrid = mine_negatives(beir, method="hybrid", encoder=encoder, num_negatives=2, depth=5, max_query_length=16,
                            max_doc_length=32, batch_size=4, teacher_scores=True, title_queries=True)
    for rec in hybrid.records:
        assert all(s == s for s in rec["scores"])  # no NaN from a zero BM25 maximum


# ----------------------------------------------------------------------------- last-sentence queries (ICT)
LONG_DOCS = {  # doc id -> (title, text); the last sentence of each is its "conclusion"
    "a0": ("Coffee", "Coffee is brewed from roasted beans. It is drunk all over the world. "
                     "These findings suggest that caffeine improves alertness in tired adults."),
    "a1": ("Tea", "Tea is made from cured leaves. Green tea has less caffeine than coffee. "
                  "We conclude that caffeine in green tea improves alertness less than coffee."),
    "a2": ("Insulin", "Insulin is a hormone of the pancreas. It lowers blood glucose after meals. "
                      "Our results indicate that insulin resistance precedes type 2 diabetes by years."),
    "a3": ("Diabetes", "Diabetes keeps blood sugar high. Type 2 diabetes is the common form. "
                       "Together these data show that obesity drives insulin resistance and diabetes."),
    "a4": ("Volcano", "A volcano lets lava escape. Eruptions can be explosive. Short last one here."),
    "a5": ("Rust", "Rust is a systems programming language focused on memory safety and speed."),
}


def test_split_last_sentence_keeps_the_rest_and_refuses_short_abstracts() -> None:
    from splade_obs.mining import split_last_sentence

    rest, last = split_last_sentence(LONG_DOCS["a2"][1])
    assert last == "Our results indicate that insulin resistance precedes type 2 diabetes by years."
    assert rest == "Insulin is a hormone of the pancreas. It lowers blood glucose after meals."
    assert split_last_sentence("Levels fell (p < 0.05). In 3 of 4 mice. (A) The dose was fixed at ten mg per kg.") \
        == ("Levels fell (p < 0.05). In 3 of 4 mice.", "(A) The dose was fixed at ten mg per kg.")
    assert split_last_sentence(LONG_DOCS["a4"][1]) is None  # the last sentence is under MIN_SENTENCE_WORDS words
    assert split_last_sentence(LONG_DOCS["a5"][1]) is None  # one sentence: nothing would be left
    assert split_last_sentence("A pH of 7.4 was kept. Cells grew. The cells grew at a pH of 7.4 for two days.")[0] \
        == "A pH of 7.4 was kept. Cells grew."  # a decimal point is not a sentence end


def _long_beir(tmp_path):
    root = tmp_path / "long"
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for did, (title, text) in LONG_DOCS.items():
            f.write(json.dumps({"_id": did, "title": title, "text": text}) + "\n")
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "does caffeine improve alertness"}) + "\n")
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\ta0\t1\n")
    return root


def test_sentence_queries_ask_each_conclusion_against_documents_without_theirs(tmp_path) -> None:
    pytest.importorskip("bm25s", reason="bm25s is in the test extra")
    from splade_obs.mining import split_last_sentence

    beir = load_beir(_long_beir(tmp_path), "train")
    plain = mine_negatives(beir, method="bm25", num_negatives=2, depth=5, teacher_scores=True)
    result = mine_negatives(beir, method="bm25", num_negatives=2, depth=5, teacher_scores=True,
                            sentence_queries=True)
    stripped = {d: beir_doc_text({"title": t, "text": split_last_sentence(x)[0] if split_last_sentence(x) else x})
                for d, (t, x) in LONG_DOCS.items()}
    asked = [r for r in result.records if r["query_id"].startswith("sentence:")]
    assert result.num_sentence_queries == len(asked) and result.num_queries == 1 + 4  # a4, a5 give no query
    assert result.num_skipped == plain.num_skipped  # every conclusion shares a word with another abstract
    assert {r["query_id"] for r in asked} == {"sentence:a0", "sentence:a1", "sentence:a2", "sentence:a3"}
    for rec in asked:
        doc = rec["query_id"].removeprefix("sentence:")
        assert rec["query"] == split_last_sentence(LONG_DOCS[doc][1])[1] and rec["positive_ids"] == [doc]
        assert rec["positives"] == [stripped[doc]] and rec["query"] not in rec["positives"][0]
        assert doc not in rec["negative_ids"] and rec["negatives"] == [stripped[n] for n in rec["negative_ids"]]
        assert len(rec["scores"]) == 1 + len(rec["negatives"])
    # the scores are BM25's against the stripped documents (the conclusion's own words are gone from all of them)
    from splade_obs.mining import bm25_search

    ids = list(LONG_DOCS)
    for rec in asked:
        got, scores = bm25_search(ids, [stripped[d] for d in ids], [rec["query"]], k=len(ids))
        bm25 = dict(zip(got[0], scores[0]))
        want = [bm25.get(d, 0.0) for d in rec["positive_ids"] + rec["negative_ids"]]
        assert rec["scores"] == pytest.approx(want, abs=1e-4)
    # the labelled queries are mined against the full documents, as without the option
    assert [r for r in result.records if not r["query_id"].startswith("sentence:")] == plain.records


def test_sentence_queries_through_the_cli(tmp_path) -> None:
    pytest.importorskip("bm25s", reason="bm25s is in the test extra")
    out = tmp_path / "t.jsonl"
    result = CliRunner().invoke(cli, ["mine-negatives", "--method", "bm25", "--data", str(_long_beir(tmp_path)),
                                      "--output", str(out), "--teacher-scores", "--sentence-queries",
                                      "--title-queries", "--num-negatives", "2", "--depth", "5"])
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    counts = {kind: sum(r["query_id"].startswith(kind + ":") for r in records) for kind in ("title", "sentence")}
    assert counts["sentence"] == 4 and counts["title"] >= 1
    assert (f"mined {len(records)} records, {counts['title']} from titles, {counts['sentence']} from last "
            "sentences (bm25, depth 5)") in result.stderr
    assert load_training_data(out).examples


# ----------------------------------------------------------------------------- a dense model in the teacher
@pytest.fixture(scope="module")
def dense():
    """A real bi-encoder without the hub: splade-tiny's BERT under sentence-transformers' mean pooling."""
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is in the test extra")
    from splade_obs.mining import load_dense_encoder

    return load_dense_encoder("splade-tiny")


def test_a_dense_model_joins_the_hybrid_teacher_by_the_fusion_formula(beir, encoder, dense) -> None:
    import numpy as np

    Stemmer = pytest.importorskip("Stemmer", reason="PyStemmer is in the test extra")
    stemmer = Stemmer.Stemmer("english")
    kwargs = dict(method="hybrid", encoder=encoder, num_negatives=3, depth=6, max_query_length=16,
                  max_doc_length=32, batch_size=4, teacher_scores=True, bm25_weight=0.3, stemmer=stemmer)
    result = mine_negatives(beir, **kwargs, dense_encoder=dense, dense_weight=0.4)
    ids = list(beir.corpus)
    texts = [beir_doc_text(beir.corpus[d]) for d in ids]
    qids = [q for q in beir.queries if q in POSITIVES]
    queries = [beir.queries[q] for q in qids]
    docs = encoder.encode(texts, max_length=32, batch_size=4)
    splade = (encoder.encode(queries, max_length=16) @ docs.T).toarray()
    bm25 = _bm25_rows(texts, queries, stemmer)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    cosine = unit(dense.encode(queries)) @ unit(dense.encode(texts)).T
    scale = float(splade.max(axis=1).mean())
    assert result.teacher_scale == pytest.approx(scale, rel=1e-6)  # the scale stays SPLADE's
    assert len(result.records) == 7
    for rec in result.records:
        i = qids.index(rec["query_id"])
        expected = [scale * (0.6 * (0.3 * bm25[i][ids.index(d)] / bm25[i].max()
                                    + 0.7 * splade[i, ids.index(d)] / splade[i].max())
                             + 0.4 * cosine[i, ids.index(d)] / cosine[i].max())
                    for d in rec["positive_ids"] + rec["negative_ids"]]
        assert rec["scores"] == pytest.approx(expected, abs=2e-3)
        assert not set(rec["negative_ids"]) & POSITIVES[rec["query_id"]]
        assert rec["scores"][1:] == sorted(rec["scores"][1:], reverse=True)
    plain = mine_negatives(beir, **kwargs)
    assert [r["scores"] for r in plain.records] != [r["scores"] for r in result.records]


def test_without_dense_candidates_the_sparse_fusion_draws_the_negatives_and_the_dense_teacher_scores_them(
        beir, encoder, dense) -> None:
    """--no-dense-candidates: the negatives of the BM25 + SPLADE teacher (same pool, same seeded draw), the scores of
    the teacher with the dense model in it; the default pool takes the dense model's top list and fused ranking."""
    Stemmer = pytest.importorskip("Stemmer", reason="PyStemmer is in the test extra")
    kwargs = dict(method="hybrid", encoder=encoder, num_negatives=2, depth=4, max_query_length=16,
                  max_doc_length=32, batch_size=4, teacher_scores=True, stemmer=Stemmer.Stemmer("english"),
                  sample=True, seed=3, title_queries=True)
    plain = mine_negatives(beir, **kwargs)
    scored = mine_negatives(beir, **kwargs, dense_encoder=dense, dense_weight=0.4, dense_candidates=False)
    full = mine_negatives(beir, **kwargs, dense_encoder=dense, dense_weight=0.4)
    key = lambda r: (r["query_id"], r["positive_ids"], r["negative_ids"])  # noqa: E731
    assert [key(r) for r in scored.records] == [key(r) for r in plain.records]
    assert scored.teacher_scale == full.teacher_scale == plain.teacher_scale
    # a document's score for a query is the dense teacher's whichever pool drew it
    full_scores = {(r["query_id"], d): s for r in full.records
                   for d, s in zip(r["positive_ids"] + r["negative_ids"], r["scores"])}
    shared = 0
    for rec in scored.records:
        for d, s in zip(rec["positive_ids"] + rec["negative_ids"], rec["scores"]):
            if (rec["query_id"], d) in full_scores:
                assert s == full_scores[rec["query_id"], d]
                shared += 1
    assert shared > len(scored.records)  # every positive and some negatives
    assert [r["scores"] for r in scored.records] != [r["scores"] for r in plain.records]
    assert [r["negative_ids"] for r in full.records] != [r["negative_ids"] for r in scored.records]


def test_dense_teacher_through_the_cli_and_its_misuse(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is in the test extra")
    data = write_beir(tmp_path / "beir", split="train")
    base = ["mine-negatives", "--data", str(data), "--num-negatives", "2", "--depth", "6", "--teacher-scores",
            "--max-query-length", "16", "--max-doc-length", "32", "--batch-size", "4"]
    out = tmp_path / "dense.jsonl"
    ok = CliRunner().invoke(cli, [*base, "--method", "hybrid", "--dense-model", "splade-tiny", "--dense-weight",
                                  "0.5", "--output", str(out)])
    assert ok.exit_code == 0, ok.output
    assert len(load_training_data(out).examples) == 7
    pooled = tmp_path / "sparse-pool.jsonl"
    ok = CliRunner().invoke(cli, [*base, "--method", "hybrid", "--dense-model", "splade-tiny",
                                  "--no-dense-candidates", "--output", str(pooled)])
    assert ok.exit_code == 0, ok.output
    assert len(load_training_data(pooled).examples) == 7
    # only the hybrid teacher takes a dense model: a config error, nothing written
    bad = CliRunner().invoke(cli, [*base, "--method", "splade", "--dense-model", "splade-tiny",
                                   "--output", str(tmp_path / "no.jsonl")])
    assert bad.exit_code == EXIT_CODES[ErrorCategory.CONFIG_ERROR] and "--method hybrid" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "no.jsonl").exists()
    missing = CliRunner().invoke(cli, [*base, "--method", "hybrid", "--dense-model", str(tmp_path / "nowhere"),
                                       "--output", str(tmp_path / "no.jsonl")])
    assert missing.exit_code == EXIT_CODES[ErrorCategory.MODEL_ERROR] and "nowhere" in missing.stderr
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # fault injection: the import fails
    gone = CliRunner().invoke(cli, [*base, "--method", "hybrid", "--dense-model", "splade-tiny",
                                    "--output", str(tmp_path / "no.jsonl")])
    assert gone.exit_code == EXIT_CODES[ErrorCategory.DEPENDENCY_ERROR]
    assert "sentence-transformers" in gone.stderr and "Traceback" not in gone.stderr
