"""Training defaults for a BEIR folder: BM25 hard negatives mined on the fly, and the run length.

``splade-obs train --train-file BEIR_FOLDER`` trains on one example per (query, relevant document) pair
(:func:`splade_obs.beir.beir_to_examples`). A BEIR folder carries no negatives, so unless
``data.beir_negatives`` is ``none`` each example gets a pool of hard negatives: the query's BM25 top
``data.beir_negatives_depth`` documents (bm25s, English stopwords, Snowball English stemming), every document
the qrels judge relevant to that query (label > 0) removed; documents judged non-relevant (label 0) stay,
they are real negatives. The collator draws ``data.num_negatives`` of the pool per example and epoch, seeded
by (seed, epoch, example), so a resumed run draws the same ones.

Why a pool and a fresh draw rather than the top few: the qrels of most BEIR sets are sparse, and the
documents ranked highest without a label are often relevant; training against those as negatives collapsed
splade-tiny on SciFact (``benchmarks/configs/scifact_finetune.toml``, configs 1-2). A draw from the top 50
is still hard (the query's words are in it), less often an unlabelled relevant one, and varies by epoch.
Measured on SciFact (docs/recipes.md#training-data): 4 epochs of these defaults lift splade-tiny from 0.644 to
0.663 nDCG@10 on test; in-batch negatives alone (``none``) gave 0.672 there.

:func:`beir_epochs`: when neither ``optim.epochs`` nor ``optim.max_steps`` is given for a BEIR folder, the
epochs that reach ``MIN_BEIR_STEPS`` optimizer steps (at least 1, at most ``MAX_BEIR_EPOCHS``): a small
folder such as SciFact's train split (919 pairs, 57 steps an epoch at batch 16) gets several passes, a large
one a single pass.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ApplicationError

if TYPE_CHECKING:  # pragma: no cover
    from .beir import BeirData

log = logging.getLogger("splade_obs.beir")

#: ``data.beir_negatives`` values.
BEIR_NEGATIVES = ("bm25", "none")
#: Default BM25 depth of the pool of negatives (before the judged positives are removed).
BEIR_NEGATIVES_DEPTH = 50
#: Optimizer steps a run on a BEIR folder reaches when neither --epochs nor --max-steps is given ...
MIN_BEIR_STEPS = 200
#: ... in at most this many epochs.
MAX_BEIR_EPOCHS = 10
STEMMER_LANGUAGE = "english"


def bm25_negative_pools(beir: "BeirData", qids: list[str], depth: int = BEIR_NEGATIVES_DEPTH) -> dict[str, list[str]]:
    """Query id -> doc ids of its BM25 top ``depth`` (best first), every document judged relevant removed.

    Deterministic (BM25 has no randomness; ties keep bm25s's order). Raises a DependencyError when bm25s is
    missing; without PyStemmer it mines unstemmed (logged).
    """
    from .beir import beir_doc_text
    from .mining import bm25_search, make_stemmer

    if not qids:
        return {}
    t0 = time.perf_counter()
    try:
        stemmer, stem_note = make_stemmer(STEMMER_LANGUAGE), "Snowball English stemming"
    except ApplicationError:
        stemmer, stem_note = None, "no stemming (PyStemmer is not installed)"
    doc_ids = list(beir.corpus)
    positives = {q: {d for d, rel in beir.qrels.get(q, {}).items() if rel > 0} for q in qids}
    k = depth + max(len(p) for p in positives.values())  # room for the positives that are removed
    try:  # bm25s sets its logger to DEBUG when first imported: import it before quieting it
        importlib.import_module("bm25s")
    except ImportError:
        pass  # bm25_search says which package is missing
    quiet = logging.getLogger("bm25s")
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))  # not its "Building index" debug lines in the run's log
    try:
        ranked, _ = bm25_search(doc_ids, [beir_doc_text(beir.corpus[d]) for d in doc_ids],
                                [beir.queries[q] for q in qids], k, stemmer=stemmer)
    finally:
        quiet.setLevel(level)
    pools = {q: [d for d in row if d not in positives[q]][:depth] for q, row in zip(qids, ranked)}
    sizes = [len(p) for p in pools.values()]
    log.info("BM25 hard negatives (data.beir_negatives=bm25): mined %d queries over %d documents in %.1f s "
             "(top %d, %s, judged positives removed; %.1f per query on average, %d queries with none)",
             len(qids), len(doc_ids), time.perf_counter() - t0, depth, stem_note,
             sum(sizes) / len(sizes), sizes.count(0))
    return pools


def count_beir_pairs(folder: str | Path, split: str) -> int | None:
    """Training examples of a BEIR folder without reading its corpus: qrels rows with label > 0 whose query has
    a text. None when the folder cannot be read (the run reports that itself, with its place)."""
    import json

    root = Path(folder)
    try:
        with open(root / "queries.jsonl", "rb") as f:
            texts = set()
            for raw in f:
                if raw.strip():
                    obj = json.loads(raw.removeprefix(b"\xef\xbb\xbf"))
                    if str(obj.get("text") or "").strip():
                        texts.add(str(obj["_id"]))
        pairs = set()
        with open(root / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
            for line in f:
                parts = line.strip().split("\t") if "\t" in line else line.split()
                if len(parts) == 3 and parts[0] in texts and parts[2].strip().lstrip("-").isdigit() \
                        and int(parts[2]) > 0:
                    pairs.add((parts[0], parts[1]))
        return len(pairs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def beir_epochs(num_examples: int, batch_size: int, gradient_accumulation_steps: int = 1,
                min_steps: int = MIN_BEIR_STEPS, max_epochs: int = MAX_BEIR_EPOCHS) -> int:
    """Epochs that reach ``min_steps`` optimizer steps over ``num_examples`` (one process), within 1..max_epochs."""
    batches = max(1, num_examples // max(1, batch_size))
    steps_per_epoch = max(1, math.ceil(batches / max(1, gradient_accumulation_steps)))
    return max(1, min(max_epochs, math.ceil(min_steps / steps_per_epoch)))


def is_beir_folder(path: Any) -> bool:
    return path is not None and Path(str(path)).is_dir()
