"""torch.distributed plumbing for ``torchrun`` (gloo on CPU, nccl on CUDA).

Choice of meaning: the representations of every rank's micro-batch are gathered (with gradient), so each
query is scored against the positives of the whole global batch plus its own hard negatives, and the FLOPS
regularizers are taken over the global batch; DDP averages the gradients. A run with N processes and
per-rank batch B is the same objective as one process with batch N*B. ``--batch-size`` is per rank; the
logged ``batch_size`` is the global one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from .config import TrainConfig
from .errors import ConfigError, TrainingError


@dataclass
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    backend: str
    device_name: str

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Buffers (position ids) are constant: no broadcast in forward, so forward has no collectives.
        if self.device_name.startswith("cuda"):
            return DDP(module, device_ids=[self.local_rank], output_device=self.local_rank, broadcast_buffers=False)
        return DDP(module, broadcast_buffers=False)

    def no_sync(self, model: torch.nn.Module) -> Any:
        return model.no_sync()

    def gather_failures(self, category: Any) -> list[tuple[int, str]]:
        """Every rank says whether its micro-batch failed (and in which category); returns the failures."""
        from .errors import ErrorCategory
        names = [c.value for c in ErrorCategory]
        code = torch.tensor([-1 if category is None else names.index(str(category))], dtype=torch.int64,
                            device=self.device_name)
        codes = [torch.empty_like(code) for _ in range(self.world_size)]
        tdist.all_gather(codes, code)
        return [(r, names[int(c)]) for r, c in enumerate(codes) if int(c) >= 0]

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out


    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def finish(self, result: Any) -> None:
        """After a finished run, wait for every rank; a rank that failed has left the group instead (it
        must not enter another collective), which surfaces here as an error naming this rank's view."""
        if result.status != "FINISHED":
            return
        try:
            tdist.barrier()
        except Exception as exc:  # noqa: BLE001 - a peer died: report it, do not hang
            result.status = "FAILED"
            result.error = TrainingError(f"rank {self.rank}: another rank failed before the end "
                                         f"({type(exc).__name__})", rank=self.rank, original_exception=exc)

    def shutdown(self) -> None:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def dist_from_env(cfg: TrainConfig) -> DistContext | None:
    """A context when launched by torchrun with WORLD_SIZE > 1, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    want_cuda = cfg.optim.device.startswith("cuda") or (cfg.optim.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", f"cuda:{local_rank}"
    else:
        backend, device = "gloo", "cpu"
    if not tdist.is_initialized():
        # 60 min: rank 0 evaluates alone at the end while the others wait
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, backend=backend, device_name=device)
