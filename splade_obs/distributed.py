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
from dataclasses import dataclass, field
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
    #: True once the ranks agreed to stop on a signal (:meth:`agree_stop`): all stand after the same step
    stopped_together: bool = False
    #: a gloo group for the stop flag under nccl (created at the first stop check, by every rank at once)
    _control: Any = field(default=None, repr=False)

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

    def agree_stop(self, signum: int) -> int:
        """The largest stop signal number any rank received (0: none), at each of the trainer's stop checks
        (a collective): a signal that reaches one rank only (one node's agent stopping its workers) stops
        every rank after the same step, so the stop checkpoint holds every rank's RNG state."""
        if self.backend == "nccl" and self._control is None:
            self._control = tdist.new_group(backend="gloo")
        # a host tensor over gloo: the check never waits for the GPU (nccl would need a device sync per check)
        flag = torch.tensor([signum], dtype=torch.int64)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self._control)
        agreed = int(flag.item())
        self.stopped_together = self.stopped_together or agreed > 0
        return agreed

    def check_same_resume(self, resume: Any, output_dir: Any) -> None:
        """On ``--resume`` every rank must continue from the same checkpoint; ranks on a node that does not see
        rank 0's output folder (a node-local ``--output-dir``) find none and would start from step 0."""
        seen = self.gather_objects(getattr(resume, "name", None))
        if len(set(seen)) > 1:
            found = ", ".join(f"rank {r}: {name or 'none'}" for r, name in enumerate(seen))
            raise ConfigError(f"the ranks found different checkpoints to resume from ({found})",
                              file_path=str(output_dir), field="checkpoint.output_dir",
                              hint="--output-dir must be one folder every node mounts (a shared file system)")

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def finish(self, result: Any) -> None:
        """After a finished run, wait for every rank; a rank that failed has left the group instead (it
        must not enter another collective), which surfaces here as an error naming this rank's view."""
        together = result.status == "KILLED" and self.stopped_together  # a stop all ranks agreed on
        if result.status != "FINISHED" and not together:
            return
        try:
            tdist.barrier()  # a stop too: rank 1 does not leave while rank 0 writes the stop checkpoint
        except Exception as exc:  # noqa: BLE001 - a peer died: report it, do not hang
            if together:
                return
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
