"""Batches: tokenized query / positive / negative tensors, and the collator that picks them.

Randomness here never touches the global RNGs: the choice of positive and negatives is a pure function of
(seed, epoch, the example), which is what makes an exact resume possible.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from .errors import DataError
from .records import Example


@dataclass
class Batch:
    """Tokenized tensors of one batch, padded to the longest sequence in it."""

    queries: dict[str, torch.Tensor]
    pos_docs: dict[str, torch.Tensor]
    neg_docs: dict[str, torch.Tensor] | None  # B*K rows: query i's negatives at rows i*K .. i*K+K-1
    num_negatives: int
    teacher_scores: torch.Tensor | None  # (B, 1+K): positive first
    size: int
    num_tokens: int

    def to(self, device: torch.device | str) -> "Batch":
        def move(d: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if d is None else {k: v.to(device, non_blocking=True) for k, v in d.items()}

        return Batch(move(self.queries), move(self.pos_docs), move(self.neg_docs), self.num_negatives,  # type: ignore[arg-type]
                     None if self.teacher_scores is None else self.teacher_scores.to(device),
                     self.size, self.num_tokens)


class PairCollator:
    """Turns a list of Examples into a Batch with dynamic padding.

    Choice rule (deterministic in (seed, epoch, the example's identity), no global RNG — so the same example
    gets the same positive/negatives whatever batch or process it lands in, which keeps a torchrun run
    comparable with a single-process run of the same global batch):
    one positive per example; K = ``num_negatives`` hard negatives per query when *every* example in the
    batch has at least one negative, else K = 0 for the whole batch. An example with fewer than K
    negatives repeats its own (shuffled) negatives to fill K, so all queries have the same K.
    Teacher scores are returned only when every example carries them.
    """

    def __init__(self, tokenizer: Any, max_query_length: int, max_doc_length: int, num_negatives: int = 1,
                 seed: int = 42) -> None:
        self.tokenizer = tokenizer
        self.max_query_length = max_query_length
        self.max_doc_length = max_doc_length
        self.num_negatives = max(0, int(num_negatives))
        self.seed = int(seed)

    def _rng(self, epoch: int, example: Example) -> random.Random:
        """Seeded by the example's identity: its file's name and line (or index), not the folder the file lies
        in, so the same data in another checkout or copy trains the same; its query where it has no location."""
        return random.Random(f"{self.seed}:{epoch}:{os.path.basename(example.location) or example.query}")

    def _tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def choose(self, example: Example, k: int, rng: random.Random) -> tuple[int, list[int]]:
        """Index of the chosen positive and the indices of the k chosen negatives."""
        pos = rng.randrange(len(example.positives))
        if k == 0:
            return pos, []
        n = len(example.negatives)
        order = rng.sample(range(n), n)
        return pos, [order[j % n] for j in range(k)]

    def negatives_for(self, examples: list[Example]) -> int:
        """K for this batch: ``num_negatives`` when every example has a negative, else 0."""
        return self.num_negatives if examples and all(ex.negatives for ex in examples) else 0

    def __call__(self, examples: list[Example], epoch: int = 0, batch_index: int = 0,
                 num_negatives: int | None = None) -> Batch:
        """``num_negatives`` may lower K (torchrun ranks agree on the smallest K so their gathers match)."""
        if not examples:
            raise DataError("empty batch — expected at least one example")
        k = self.negatives_for(examples)
        if num_negatives is not None:
            k = min(k, num_negatives)
        queries, positives, negatives, scores = [], [], [], []
        with_scores = all(ex.scores is not None for ex in examples)
        for i, ex in enumerate(examples):
            pos, negs = self.choose(ex, k, self._rng(epoch, ex))
            queries.append(ex.query)
            positives.append(ex.positives[pos])
            negatives.extend(ex.negatives[j] for j in negs)
            if with_scores:
                scores.append([ex.scores[0]] + [ex.scores[1 + j] for j in negs])  # type: ignore[index]
        q = self._tokenize(queries, self.max_query_length)
        d = self._tokenize(positives, self.max_doc_length)
        n = self._tokenize(negatives, self.max_doc_length) if k else None
        tokens = sum(int(t["attention_mask"].sum()) for t in (q, d, n) if t is not None)
        teacher = torch.tensor(scores, dtype=torch.float32) if with_scores else None
        return Batch(q, d, n, k, teacher, len(examples), tokens)


class Prefetch:
    """The next micro-batch's collation (choosing its documents, tokenizing them) on a worker thread while the
    current one computes, so tokenization leaves the step path.

    The trainer :meth:`submit`\\ s batch ``i + 1`` before batch ``i``'s forward and :meth:`settle`\\ s before
    anything else may use the tokenizer (a fast tokenizer's padding state is not safe to share between threads),
    so the two never tokenize at once. :meth:`take` returns the prefetched batch when it is the one asked for,
    raising its collation error there (the batch policy sees it as before), else collates in place. The collator
    draws from no global RNG, so prefetching changes no batch and keeps exact resume.
    """

    def __init__(self, collator: Any, enabled: bool = True) -> None:
        self.collator = collator
        self._pool = None
        if enabled:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splade-obs-collate")
        self._pending: tuple[Any, Any] | None = None

    def submit(self, key: Any, examples: list[Example], **kwargs: Any) -> None:
        if self._pool is not None:
            self.settle()
            self._pending = (key, self._pool.submit(self.collator, examples, **kwargs))

    def take(self, key: Any, examples: list[Example], **kwargs: Any) -> Batch:
        pending, self._pending = self._pending, None
        if pending is not None:
            if pending[0] == key:
                return pending[1].result()
            pending[1].exception()  # another batch's: wait for it (and drop it) before tokenizing here
        return self.collator(examples, **kwargs)

    def settle(self) -> None:
        """Wait until no collation runs on the worker (its result, or error, stays for :meth:`take`)."""
        if self._pending is not None:
            self._pending[1].exception()

    def close(self) -> None:
        self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
