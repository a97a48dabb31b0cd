"""A BEIR corpus kept on disk (splade_obs.beir.CorpusFile): the same documents as the dict, errors on the same
lines, and an evaluation from disk that never holds more than one block of the corpus's text."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import pytest

from splade_obs.beir import BOM, CorpusFile, beir_doc_text, load_beir
from splade_obs.errors import DataError

from ._eval_utils import write_beir


def _corpus(tmp_path, lines: list[str]) -> None:
    root = write_beir(tmp_path / "beir")
    (root / "corpus.jsonl").write_bytes(BOM + "\n".join(lines).encode("utf-8") + b"\n")
    return root


def test_lazy_corpus_holds_the_same_documents_as_the_dict(tmp_path):
    root = _corpus(tmp_path, [
        json.dumps({"_id": "a", "title": "Ölçü", "text": "first Ünïcode text"}),
        "",
        json.dumps({"_id": 7, "text": "an int id, no title"}),
        json.dumps({"_id": "b", "title": "T", "text": None}),
        "   ",
        json.dumps({"_id": "a", "title": "again", "text": "a repeated id keeps its place, the last record wins"}),
        json.dumps({"_id": "c", "title": "", "text": "last"}),
    ])
    eager, lazy = load_beir(root), load_beir(root, lazy_corpus=True)
    assert isinstance(lazy.corpus, CorpusFile) and lazy.digest == eager.digest
    assert list(lazy.corpus) == list(eager.corpus) == ["a", "7", "b", "c"]
    assert {d: lazy.corpus[d] for d in lazy.corpus} == eager.corpus
    texts = lazy.corpus.texts()
    expected = [beir_doc_text(eager.corpus[d]) for d in eager.corpus]
    assert len(texts) == 4 and list(texts) == expected
    assert texts[1:3] == expected[1:3] and texts[-1] == expected[-1] and texts[::2] == expected[::2]
    assert "7" in lazy.corpus and "z" not in lazy.corpus
    with pytest.raises(IndexError):
        texts[4]
    with pytest.raises(KeyError):
        lazy.corpus["z"]


def test_lazy_corpus_reports_a_broken_line_as_the_dict_does(tmp_path):
    root = _corpus(tmp_path, [json.dumps({"_id": "a", "text": "x"}), "", '{"_id": "b", "text": '])
    for lazy in (False, True):
        with pytest.raises(DataError) as info:
            load_beir(root, lazy_corpus=lazy)
        assert info.value.context["line_number"] == 3 and "corpus.jsonl:3" in str(info.value)


def test_evaluation_from_disk_holds_one_block_of_text_not_the_corpus(tmp_path, tiny_model_path, monkeypatch):
    """400 documents of 50 kB (20 MB of text) evaluated with --index-dir in blocks of 40: the Python heap's peak
    stays under a quarter of the corpus, where reading the corpus eagerly alone takes more than all of it."""
    from splade_obs.evaluation import RetrievalEvaluator
    from splade_obs.model import SpladeEncoder

    rng = random.Random(5)
    words = [f"{w}{i}" for i in range(300) for w in ("cell", "gene", "drug", "virus")]
    root = write_beir(tmp_path / "beir")
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(400):
            text = " ".join(rng.choices(words, k=7000))[:50_000]
            f.write(json.dumps({"_id": f"d{i}", "title": f"doc {i}", "text": text}) + "\n")
    corpus_mb = (root / "corpus.jsonl").stat().st_size / 2**20
    monkeypatch.setattr("splade_obs.encoding.BLOCK_SIZE", 40)
    encoder = SpladeEncoder.from_pretrained(tiny_model_path, device="cpu")
    import splade_obs.cpu as cpu

    trims, real_release = [], cpu.release_heap
    monkeypatch.setattr(cpu, "release_heap", lambda: trims.append(real_release()) or True)

    tracemalloc.start()
    try:
        load_beir(root)
        eager_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.reset_peak()
        beir = load_beir(root, lazy_corpus=True)
        evaluator = RetrievalEvaluator(beir, max_doc_length=8, max_query_length=8, batch_size=40,
                                       index_dir=tmp_path / "index")
        metrics = evaluator.evaluate(encoder)
        lazy_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert metrics["num_docs"] == 400 and metrics["num_queries"] > 0
    assert eager_mb > corpus_mb * 0.9, (eager_mb, corpus_mb)
    assert lazy_mb < corpus_mb / 4, (lazy_mb, corpus_mb)
    assert len(trims) >= 400 // 40  # the C heap handed back after every block (splade_obs.cpu.release_heap)


def _anon_mb() -> float:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def cpu_release_heap_works() -> bool:
    from splade_obs.cpu import _malloc_trim

    return _malloc_trim() is not None


@pytest.mark.skipif(not Path("/proc/self/status").exists() or not cpu_release_heap_works(),
                    reason="needs Linux's /proc and glibc's malloc_trim")
def test_encoding_many_batches_keeps_the_heap_flat(tiny_model_path):
    """One encode call of 48 batches of 128 texts: each batch's (B, V) tensors are freed, but glibc's heap kept
    them resident (anonymous RSS growing with the batches) until the encoder handed the heap back after every
    batch (splade_obs.cpu.release_heap); the growth now stays within ten batches' tensors (measured: 70-85 MB,
    275 MB without)."""
    from splade_obs.model import SpladeEncoder

    encoder = SpladeEncoder.from_pretrained(tiny_model_path, device="cpu")
    rng = random.Random(3)
    words = [f"{w}{i}" for i in range(400) for w in ("cell", "gene", "drug", "virus", "protein")]
    texts = [" ".join(rng.choices(words, k=rng.randint(3, 30))) for _ in range(48 * 128)]
    encoder.encode(texts[:256], max_length=16, batch_size=128)  # warm-up: kernels, thread pools
    start, peak, forward = _anon_mb(), [0.0], encoder.forward

    def watched(*args):
        out = forward(*args)
        peak[0] = max(peak[0], _anon_mb())
        return out

    encoder.forward = watched
    vectors = encoder.encode(texts, max_length=16, batch_size=128)
    one_batch_mb = 128 * encoder.vocab_size * 4 / 2**20
    assert vectors.shape[0] == len(texts) and vectors.nnz > 0
    assert peak[0] - start < 10 * one_batch_mb, (start, peak[0], one_batch_mb)



def test_lazy_corpus_ids_are_packed_and_repeats_found_even_when_hashes_collide(tmp_path, monkeypatch):
    """The ids live in one buffer (splade_obs.beir.IdTable), not as a Python string per document, and repeated ids
    are found by hash then by bytes: with every hash equal the mapping is still the dict's."""
    import splade_obs.beir as beir

    records = [{"_id": f"doc-{i % 700}", "title": "", "text": f"text {i}"} for i in range(1000)]
    root = _corpus(tmp_path, [json.dumps(r, ensure_ascii=False) for r in records])
    eager = load_beir(root)
    monkeypatch.setattr(beir, "hash", lambda _: 7, raising=False)  # every id in one hash bucket
    lazy = load_beir(root, lazy_corpus=True)
    monkeypatch.undo()
    assert list(lazy.corpus) == list(eager.corpus) and len(lazy.corpus) == 700
    assert {d: lazy.corpus[d] for d in lazy.corpus} == eager.corpus  # the last record of a repeated id wins
    ids = lazy.corpus.ids
    assert ids[3] == "doc-3" and ids[-1] == "doc-699" and ids[1:3] == ["doc-1", "doc-2"]
    assert ids.index("doc-42") == 42 and "doc-700" not in ids and ids == [f"doc-{i}" for i in range(700)]

    big = [json.dumps({"_id": f"PMID-{i:08d}~{i % 13}", "text": "x"}) for i in range(50_000)]
    root = _corpus(tmp_path / "big", big)
    tracemalloc.start()
    try:
        corpus = CorpusFile(root / "corpus.jsonl")
        kept_mb = tracemalloc.get_traced_memory()[0] / 2**20
    finally:
        tracemalloc.stop()
    assert len(corpus) == 50_000 and corpus.ids[49_999] == "PMID-00049999~1"
    assert corpus.ids.nbytes < 50_000 * 25
    assert kept_mb < 50_000 * 45 / 2**20, kept_mb  # ids, offsets and lines: no Python object per document
