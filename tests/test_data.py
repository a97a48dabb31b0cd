"""Data readers, record validation, BEIR folders, epoch order and the collator (data.py, records.py, beir.py, collate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splade_obs import data as data_mod
from splade_obs.beir import beir_doc_text, load_beir
from splade_obs.collate import PairCollator
from splade_obs.data import demo_path, epoch_order, file_digest, load_training_data
from splade_obs.records import Example
from splade_obs.errors import DataError, ErrorCategory

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact"

RECORDS = [
    {"query": "what river flows through Velmora", "positive": "The river Tasko flows through Velmora."},
    {"query": "who makes the Kettle K2", "positives": ["Brim Works makes the K2.", "The K2 is built by Brim."],
     "negatives": ["Zorn Labs makes the Z9."]},
    {"query": "how long to cook quince pie", "positive": "Quince pie cooks for 40 minutes.",
     "negatives": ["Lentil soup cooks for 20 minutes.", "Quince pie comes from Tezim."],
     "scores": [9.5, 2.0, 1.0], "extra_key": "allowed"},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_beir(root: Path, qrels_rows: list[str]) -> Path:
    (root / "qrels").mkdir(parents=True)
    docs = [{"_id": "d1", "title": "Velmora", "text": "A city on the Tasko."},
            {"_id": "d2", "title": "", "text": "The K2 kettle."},
            {"_id": "d3", "title": "Quince", "text": "Pie recipe."}]
    queries = [{"_id": "q1", "text": "river of Velmora"}, {"_id": "q2", "text": "kettle K2"},
               {"_id": "q3", "text": "a query with no relevant document"}]
    write_jsonl(root / "corpus.jsonl", docs)
    write_jsonl(root / "queries.jsonl", queries)
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(r + "\n" for r in qrels_rows))
    return root


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from splade_obs.hub import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("splade-tiny"))


# ------------------------------------------------------------------------------------------ readers
def test_jsonl_and_json_array_give_the_same_examples(tmp_path):
    jl = load_training_data(str(write_jsonl(tmp_path / "t.jsonl", RECORDS)))
    arr_path = tmp_path / "t.json"
    arr_path.write_text("  \n" + json.dumps(RECORDS, indent=2), encoding="utf-8")
    arr = load_training_data(str(arr_path))
    assert (jl.fmt, arr.fmt) == ("jsonl", "json")
    strip = lambda ex: (ex.query, ex.positives, ex.negatives, ex.scores)  # noqa: E731
    assert [strip(e) for e in jl.examples] == [strip(e) for e in arr.examples]
    assert len(jl.examples) == 3
    assert jl.examples[1].location == f"{tmp_path / 't.jsonl'}:2"
    assert arr.examples[1].location == f"{arr_path}[1]"
    assert jl.digest == file_digest(tmp_path / "t.jsonl") and arr.digest == file_digest(arr_path)
    assert jl.digest != arr.digest and jl.num_skipped == 0 and jl.problems == []


def test_positive_positives_negatives_and_scores(tmp_path):
    ex = load_training_data(str(write_jsonl(tmp_path / "t.jsonl", RECORDS))).examples
    assert ex[0].positives == ("The river Tasko flows through Velmora.",) and ex[0].negatives == ()
    assert ex[0].scores is None
    assert ex[1].positives == ("Brim Works makes the K2.", "The K2 is built by Brim.")
    assert ex[1].negatives == ("Zorn Labs makes the Z9.",)
    assert ex[2].scores == (9.5, 2.0, 1.0) and len(ex[2].negatives) == 2


def test_blank_lines_and_bom_are_tolerated(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS[0]).encode() + b"\n\n   \n" + json.dumps(RECORDS[1]).encode())
    loaded = load_training_data(str(p))
    assert len(loaded.examples) == 2 and loaded.examples[1].location.endswith(":4")


def test_demo_data_loads_and_is_well_formed():
    train = load_training_data(None)
    val = load_training_data(str(demo_path("val")))
    assert train.fmt == "demo" and 300 <= len(train.examples) <= 1000 and len(val.examples) >= 40
    assert train.digest == file_digest(demo_path("train"))
    for ex in train.examples + val.examples:
        assert 15 <= len(ex.positives[0].split()) <= 60
        assert ex.negatives and ex.positives[0] not in ex.negatives
        q_words = {w.strip("?").lower() for w in ex.query.split()}
        assert q_words & {w.strip(".,").lower() for w in ex.positives[0].split()} - {"the", "a", "of", "is"}
    train_queries = {e.query for e in train.examples}
    assert not train_queries & {e.query for e in val.examples}


def test_demo_generator_is_deterministic(tmp_path):
    from splade_obs.demo.make_demo import main

    main(["--out-dir", str(tmp_path)])
    assert (tmp_path / "train.jsonl").read_bytes() == demo_path("train").read_bytes()
    assert (tmp_path / "val.jsonl").read_bytes() == demo_path("val").read_bytes()


# ------------------------------------------------------------------------------------------ BEIR
def test_beir_folder_becomes_pairs(tmp_path):
    root = write_beir(tmp_path / "beir", ["q1\td1\t1", "q2\td2\t2", "q2\td3\t0", "q3\td1\t0"])
    beir = load_beir(root, "train")
    assert beir.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 0}, "q3": {"d1": 0}}
    assert beir_doc_text(beir.corpus["d1"]) == "Velmora A city on the Tasko."
    assert beir_doc_text(beir.corpus["d2"]) == "The K2 kettle."
    loaded = load_training_data(str(root), split="train")
    assert loaded.fmt == "beir" and loaded.digest == beir.digest
    assert [(e.query, e.positives) for e in loaded.examples] == [
        ("river of Velmora", ("Velmora A city on the Tasko.",)), ("kettle K2", ("The K2 kettle.",))]
    assert loaded.examples[1].location.endswith("queries.jsonl:2 [doc d2]")  # one example per (query, positive)


def test_beir_digest_changes_with_qrels(tmp_path):
    a = load_beir(write_beir(tmp_path / "a", ["q1\td1\t1"]), "train").digest
    b = load_beir(write_beir(tmp_path / "b", ["q1\td2\t1"]), "train").digest
    assert a != b


def test_beir_missing_split_names_what_is_missing(tmp_path):
    root = write_beir(tmp_path / "beir", ["q1\td1\t1"])
    with pytest.raises(DataError) as info:
        load_training_data(str(root), split="dev")
    assert "qrels/dev.tsv" in info.value.message and "train" in info.value.message


@pytest.mark.skipif(not SCIFACT.is_dir(), reason=f"SciFact BEIR folder not present at {SCIFACT}")
def test_scifact_train_split_gives_one_example_per_query_positive_pair():
    loaded = load_training_data(str(SCIFACT), split="train", beir_negatives="none")
    beir = load_beir(SCIFACT, "train")
    with_pos = [q for q, rels in beir.qrels.items() if any(r > 0 for r in rels.values())]
    pairs = [(q, d) for q, rels in beir.qrels.items() for d, r in rels.items() if r > 0]
    assert len(with_pos) == 809 and len(pairs) == 919
    assert len(loaded.examples) == 919 and len({e.location.split(" [")[0] for e in loaded.examples}) == 809
    assert all(e.query and len(e.positives) == 1 and not e.negatives for e in loaded.examples)


# ------------------------------------------------------------------------------------------ order
def test_epoch_order_is_reproducible_and_differs_per_epoch():
    torch.manual_seed(0)
    a = epoch_order(100, seed=7, epoch=0)
    torch.manual_seed(999)  # the global RNG must not matter
    b = epoch_order(100, seed=7, epoch=0)
    assert a == b and sorted(a) == list(range(100))
    assert epoch_order(100, seed=7, epoch=1) != a
    assert epoch_order(100, seed=8, epoch=0) != a
    state = torch.get_rng_state()
    epoch_order(10, 1, 0)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------------------ collator
def _examples() -> list[Example]:
    return [
        Example("short q", ("p one", "p two", "p three"), ("n1", "n2", "n3"), None),
        Example("a much longer query with many more words in it", ("a positive passage " * 20,), ("neg a",), None),
        Example("q three", ("tiny",), ("x", "y"), None),
    ]


def test_collator_pads_to_the_longest_in_batch_within_max(tokenizer):
    col = PairCollator(tokenizer, max_query_length=16, max_doc_length=32, num_negatives=2, seed=1)
    batch = col(_examples(), epoch=0, batch_index=0)
    q, d = batch.queries, batch.pos_docs
    assert set(q) == {"input_ids", "attention_mask"}
    assert q["input_ids"].shape[1] == int(q["attention_mask"].sum(1).max()) <= 16
    assert d["input_ids"].shape[1] == int(d["attention_mask"].sum(1).max()) <= 32
    assert batch.size == 3 and batch.num_negatives == 2
    assert batch.neg_docs["input_ids"].shape[0] == 6  # B*K rows
    short = col(_examples()[:1] + _examples()[2:], epoch=0, batch_index=0)  # without the long one
    assert short.queries["input_ids"].shape[1] < q["input_ids"].shape[1]
    total = sum(int(t["attention_mask"].sum()) for t in (q, d, batch.neg_docs))
    assert batch.num_tokens == total
    assert batch.teacher_scores is None
    moved = batch.to("cpu")
    assert torch.equal(moved.queries["input_ids"], q["input_ids"])


def _chosen(batch, tokenizer) -> tuple[list[str], list[str]]:
    dec = lambda t: tokenizer.batch_decode(t["input_ids"], skip_special_tokens=True)  # noqa: E731
    return dec(batch.pos_docs), dec(batch.neg_docs) if batch.neg_docs is not None else []


def test_collator_choice_is_deterministic_and_ignores_global_rng(tokenizer):
    exs = _examples()
    col = PairCollator(tokenizer, 16, 32, num_negatives=2, seed=3)
    import random

    random.seed(1)
    torch.manual_seed(1)
    first = _chosen(col(exs, epoch=2, batch_index=5), tokenizer)
    random.seed(2)
    torch.manual_seed(2)
    again = _chosen(PairCollator(tokenizer, 16, 32, num_negatives=2, seed=3)(exs, epoch=2, batch_index=5), tokenizer)
    assert first == again
    # Query i's negatives are its own: rows i*K .. i*K+K-1 come from example i.
    pos, negs = first
    assert set(negs[0:2]) <= {"n1", "n2", "n3"} and len(set(negs[0:2])) == 2
    assert set(negs[2:4]) == {"neg a"}  # one negative, reused to fill K=2
    assert set(negs[4:6]) == {"x", "y"}
    # Different epochs / batches / seeds explore different choices of positive for example 0.
    seen = {_chosen(col(exs, epoch=e, batch_index=b), tokenizer)[0][0] for e in range(6) for b in range(3)}
    assert seen == {"p one", "p two", "p three"}


def test_collator_drops_negatives_when_an_example_has_none_and_passes_teacher_scores(tokenizer):
    col = PairCollator(tokenizer, 16, 32, num_negatives=1, seed=0)
    mixed = [Example("q", ("p",), ("n",)), Example("r", ("s",), ())]
    b = col(mixed)
    assert b.neg_docs is None and b.num_negatives == 0
    scored = [Example("q", ("p",), ("n1", "n2"), (9.0, 1.0, 2.0)), Example("r", ("s",), ("m1", "m2"), (8.0, 3.0, 4.0))]
    b = col(scored, epoch=0, batch_index=0)
    assert b.teacher_scores.shape == (2, 2)
    _, negs = _chosen(b, tokenizer)
    expected = [[9.0, {"n1": 1.0, "n2": 2.0}[negs[0]]], [8.0, {"m1": 3.0, "m2": 4.0}[negs[1]]]]
    assert b.teacher_scores.tolist() == expected


# ------------------------------------------------------------------------------------------ policies
def _bad_file(tmp_path: Path, n_bad: int) -> Path:
    lines = [json.dumps(RECORDS[0])]
    for i in range(n_bad):
        lines.append(json.dumps({"query": "", "positive": f"p{i}"}) if i % 2 else json.dumps({"positive": "p"}))
    lines.append("{not json")
    lines.append(json.dumps(RECORDS[1]))
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_skip_policy_writes_bad_records_with_counts(tmp_path):
    p = _bad_file(tmp_path, n_bad=4)
    out = tmp_path / "logs" / "bad_records.jsonl"
    loaded = load_training_data(str(p), on_bad_record="skip", bad_records_path=out)
    assert len(loaded.examples) == 2 and loaded.num_skipped == 5
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 5
    assert [r["location"] for r in rows] == [f"{p}:{i}" for i in range(2, 7)]
    assert rows[0]["field"] == "query" and "missing" in rows[0]["message"]
    assert rows[1]["field"] == "query" and "empty" in rows[1]["message"]
    assert rows[4]["field"] == "" and "invalid JSON" in rows[4]["message"] and rows[4]["record"] == "{not json"
    assert json.loads(rows[0]["record"]) == {"positive": "p"}
    assert len(loaded.problems) == 5


def test_skip_policy_truncates_long_records(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"query": "", "positive": "x" * 10_000}) + "\n" + json.dumps(RECORDS[0]) + "\n")
    out = tmp_path / "bad.jsonl"
    load_training_data(str(p), on_bad_record="skip", bad_records_path=out)
    row = json.loads(out.read_text())
    assert len(row["record"]) < 2100 and "more characters" in row["record"]


def test_skip_policy_with_nothing_left_is_an_error(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"query": "q"}, {"positive": "p"}])
    with pytest.raises(DataError) as info:
        load_training_data(str(p), on_bad_record="skip")
    assert "no training examples" in info.value.message and "2 bad record" in info.value.message


def test_error_policy_lists_all_problems_up_to_the_cap(tmp_path):
    p = _bad_file(tmp_path, n_bad=30)
    with pytest.raises(DataError) as info:
        load_training_data(str(p), max_reported=20)
    err = info.value
    assert err.category is ErrorCategory.DATA_ERROR
    assert err.context["line_number"] == 2 and err.context["field"] == "query"
    assert err.context["num_problems"] == 31 and len(err.problems) == 31
    listed = [ln for ln in err.message.splitlines() if ln.startswith(f"  {p}:")]
    assert len(listed) == 20
    assert "... and 11 more" in err.message
    assert err.one_line().startswith(f'error[DATA_ERROR]: {p}:2: field "query" is missing — expected a non-empty string')
    assert "--on-bad-record skip" in err.hint_text()


def test_error_policy_collects_problems_of_a_json_array(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps([RECORDS[0], {"query": 5, "positive": "p"}, {"query": "q", "positives": []}]))
    with pytest.raises(DataError) as info:
        load_training_data(str(p))
    err = info.value
    assert err.context["index"] == 1 and err.location == f"{p}[1]"
    assert 'field "query" is a number (5) — expected a non-empty string' in err.message
    assert f'{p}[2]: field "positives" is an empty list' in err.message


def test_problem_renders_as_one_line():
    pr = data_mod.Problem("train.jsonl:17", "query", "is missing", "a non-empty string")
    assert str(pr) == 'train.jsonl:17: field "query" is missing — expected a non-empty string'


def test_the_same_file_in_another_folder_gets_the_same_choices(tmp_path, tokenizer):
    """The collator's choice of positive and negatives follows the example's file name and line, not the folder
    the file lies in: a copy of the training data elsewhere (another clone) trains the same."""
    lines = [json.dumps({"query": f"query {i}", "positives": [f"pos {i} a", f"pos {i} b", f"pos {i} c"],
                         "negatives": [f"neg {i} {j}" for j in range(6)]}) for i in range(4)]
    chosen = []
    for folder in ("one", "two/deeper"):
        path = tmp_path / folder / "train.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        examples = load_training_data(path).examples
        assert examples[0].location == f"{path}:1"
        col = PairCollator(tokenizer, 16, 32, num_negatives=2, seed=7)
        chosen.append([_chosen(col(examples, epoch=e, batch_index=0), tokenizer) for e in range(3)])
    assert chosen[0] == chosen[1]
    assert len({tuple(negs) for _, negs in chosen[0]}) > 1  # the choices do vary, with the epoch
