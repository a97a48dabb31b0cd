"""Sharded encoding for ``encode``, ``evaluate`` and ``mine-negatives`` under ``torchrun``.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1 in the environment) each rank encodes one contiguous
shard of the texts: rank ``r`` of ``W`` takes positions ``[r * n // W, (r + 1) * n // W)``, so shard sizes
differ by at most one and the shards, put back in rank order, are the input order. Within a shard the
encoder sorts by token length as it always does. Rank 0 then merges: ``encode`` concatenates the part files
each rank wrote atomically beside the output (``.NAME.partR-of-W``, deleted after the merge, so the output
directory must be one every rank can reach); ``evaluate`` and ``mine-negatives`` gather the shards' sparse
rows to rank 0 over a gloo process group and go on exactly as one process would (one index, one ranking).
The attention mask hides a batch's padding, so a text's vector does not depend on its batch mates except in
the last float32 bits (a batch padded to another length sums in another order): the merged result is the
single-process one, same records in the same order, same rankings and metrics (tests/test_sharded.py).

Without ``torchrun`` nothing here runs: :func:`shard_from_env` returns None, no process group is created and
the commands take their single-process paths unchanged. The process group is gloo even when the model runs
on a GPU (``cuda:LOCAL_RANK``): only Python objects go through it. A rank that fails still joins the next
collective, with its error, so every rank stops with an error naming the rank instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .atomic import atomic_writer
from .errors import ApplicationError, ConfigError, ErrorCategory, classify

#: How long a rank waits for the others at a collective: rank 0 alone merges, indexes and retrieves while the
#: others wait for its metrics, which on a corpus of millions of documents takes a while. A rank that fails
#: says so at the next collective (:meth:`Shard.collect`), so the others do not wait this long for it.
TIMEOUT_S = 6 * 3600


@dataclass(frozen=True)
class Shard:
    """This process's place among the ranks of a ``torchrun`` launch."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """``[lo, hi)``: the contiguous positions of ``n`` items that ``rank`` (default: this one) owns."""
        r = self.rank if rank is None else rank
        return r * n // self.world_size, (r + 1) * n // self.world_size

    def counts(self, n: int) -> list[int]:
        """Items of every rank, in rank order."""
        return [hi - lo for lo, hi in (self.bounds(n, r) for r in range(self.world_size))]

    def collect(self, fn: Callable[[], Any]) -> list[Any] | None:
        """Run ``fn`` here; rank 0 gets every rank's result in rank order, the others None.

        When ``fn`` fails on any rank, every rank raises: the failing one its own error, the others an error
        of the same category naming the rank that failed (a rank never waits on a peer that is gone).
        """
        import torch.distributed as tdist

        try:
            value, error = fn(), None
        except Exception as exc:  # noqa: BLE001 - handed to every rank, then raised
            value, error = None, exc
        status: list[Any] = [None] * self.world_size
        typed = None if error is None else classify(error)
        tdist.all_gather_object(status, None if typed is None else (typed.category.value, _message(typed)))
        if error is not None:
            raise error
        failed = [(r, s) for r, s in enumerate(status) if s is not None]
        if failed:
            r, (category, line) = failed[0]
            raise ApplicationError(f"rank {r} of {self.world_size} failed: {line}", category=ErrorCategory(category),
                                   rank=r, hint="see that rank's own error above")
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        tdist.gather_object(value, out, dst=0)
        return out

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 alone; every rank returns its result, or raises (rank 0 its own error, the
        others one of the same category naming rank 0)."""
        import torch.distributed as tdist

        error = None
        try:
            box = [("ok", fn())] if self.is_main else [None]
        except Exception as exc:  # noqa: BLE001 - handed to every rank, then raised
            typed = classify(exc)
            error, box = exc, [("error", (typed.category.value, _message(typed)))]
        tdist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        state, value = box[0]
        if state == "error":
            raise ApplicationError(f"rank 0 of {self.world_size} failed: {value[1]}",
                                   category=ErrorCategory(value[0]), rank=0, hint="see rank 0's own error")
        return value


def _message(err: ApplicationError) -> str:
    """The error's one line without its ``error[CATEGORY]: `` prefix (the peers' own error adds theirs)."""
    return err.one_line().split("]: ", 1)[-1]


def shard_from_env() -> Shard | None:
    """A :class:`Shard` (and a gloo process group) when launched by torchrun with WORLD_SIZE > 1, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    rank = int(os.environ.get("RANK", "0"))
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return Shard(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", str(rank))))


@contextlib.contextmanager
def shard_session() -> Iterator[Shard | None]:
    """:func:`shard_from_env` for the length of a command; the process group (if any) is closed after."""
    shard = shard_from_env()
    try:
        yield shard
    finally:
        if shard is not None:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def rank_device(name: str, shard: Shard | None, flag: str = "--device") -> str:
    """:func:`~splade_obs.device.device_name`, with a bare ``cuda`` (or ``auto`` on a GPU machine) meaning
    ``cuda:LOCAL_RANK`` under torchrun, so ranks on one machine use one GPU each."""
    from .device import device_name

    resolved = device_name(name, flag)
    if shard is None or resolved != "cuda":
        return resolved
    import torch

    if torch.cuda.device_count() <= shard.local_rank:
        raise ConfigError(f"LOCAL_RANK {shard.local_rank} has no GPU ({torch.cuda.device_count()} visible)",
                          field=flag, hint="start at most one rank per GPU (--nproc_per_node), or pass --device cpu")
    return f"cuda:{shard.local_rank}"


def part_path(output: str | Path, rank: int, world_size: int) -> Path:
    """Where ``rank`` writes its part of ``output``: a hidden file beside it."""
    out = Path(output)
    return out.parent / f".{out.name}.part{rank}-of-{world_size}"


def merge_parts(output: str | Path, parts: Sequence[Path]) -> Path:
    """Concatenate ``parts`` in order into ``output`` (atomically), then delete them."""
    with atomic_writer(output, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
    for part in parts:
        part.unlink(missing_ok=True)
    return Path(output)


def encode_sharded(encoder: Any, texts: Sequence[str], shard: Shard, *, progress: Any = None,
                   **kwargs: Any) -> Any:
    """This rank encodes its shard of ``texts`` (``encode_with_progress``, ``progress`` shown on rank 0 only);
    rank 0 returns the CSR matrix of all of them in input order, the other ranks None."""
    import scipy.sparse as sp

    from .progress_util import encode_in_blocks

    lo, hi = shard.bounds(len(texts))
    parts = shard.collect(lambda: encode_in_blocks(encoder, texts, start=lo, stop=hi,
                                                   progress=progress if shard.is_main else None, **kwargs))
    if parts is None:
        return None
    if progress is not None:  # the bar counts every text, the other ranks' included
        progress.update(len(texts) - (hi - lo))
    return sp.vstack(parts, format="csr")


def encode_sharded_to_disk(encoder: Any, texts: Sequence[str], shard: Shard, folder: str | Path, *,
                           progress: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """``evaluate --index-dir`` under torchrun: each rank encodes its shard block by block into its own matrix
    folder ``DIR/docs.partR-of-W`` (sealed when complete, so ``DIR`` must be one every rank can reach); rank 0
    concatenates them on disk, in rank order, into ``DIR/docs`` and transposes that into ``DIR/postings``.
    Nothing the size of the corpus passes through memory or the process group. Rank 0 gets both matrices
    memory-mapped, the other ranks ``(None, None)``."""
    from .csr_store import concat_to, encode_rows, transpose_to

    folder = Path(folder)
    lo, hi = shard.bounds(len(texts))
    part = folder / f"docs.part{shard.rank}-of-{shard.world_size}"
    parts = shard.collect(lambda: str(encode_rows(encoder, texts, part, start=lo, stop=hi,
                                                  progress=progress if shard.is_main else None, **kwargs)))
    if parts is None:
        return None, None
    if progress is not None:  # the bar counts every text, the other ranks' included
        progress.update(len(texts) - (hi - lo))
    docs = concat_to(parts, folder / "docs")
    return docs, transpose_to(docs, folder / "postings")
