"""Where a training step's time goes (issue 36, point 2): ``torch.profiler`` over steps of the configuration
``bench_speed.py --part train`` measures (batch 16, query + positive + 1 hard negative, lengths 64/256, auto
precision), printed as the operators' table sorted by their own CPU time.

The profiler skips the first ``--wait`` steps (start-up), warms up one, then records ``--active`` steps; a
global optimizer step hook advances it after every optimizer step (``StepDone`` events cannot: the trainer
hands them to the bus in groups, not at each step's end). The table and the profiled steps' mean wall
time go to stdout and, with ``--output``, to a text file::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_train.py --output /tmp/profile.txt
    .venv/bin/python benchmarks/profile_train.py --quick     # 2 recorded steps at lengths 16/32: checks the script

``--count-ops`` counts instead the aten operators the recorded steps dispatch, by phase (forward, backward,
loss, optimizer, the rest), with views (which launch no kernel) apart, on the code path a GPU takes: the
head's batch-wide tiles, torch's own dropout and SDPA with the mask built as for a GPU tensor, one encoder pass
for queries, positives and negatives (``--passes 2`` / ``3``: the former steps). On a GPU our step is bound by
the host's kernel launches (docs/benchmarks.md, "GPU check"), so this is the CPU's measure of that host work
between GPU sessions. The
``syncs`` column counts the calls that would make the host wait for a GPU to finish (a value read back:
``item``, ``tolist``, ``bool(tensor)``; an output sized by data: ``nonzero``, boolean-mask indexing, ``unique``),
and the operators behind them are listed under the table::

    .venv/bin/python benchmarks/profile_train.py --count-ops --precision bf16 --output /tmp/ops.txt
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from _common import CONFIGS, DEFAULT_DATA, require_beir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--config", type=Path, default=CONFIGS / "scifact_finetune.toml")
    ap.add_argument("--triples", type=Path, default=Path("/tmp/splade-obs-bench/scifact_train_triples.jsonl"))
    ap.add_argument("--wait", type=int, default=4, help="steps left out before profiling (start-up)")
    ap.add_argument("--active", type=int, default=8, help="steps recorded")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--output", type=Path)
    ap.add_argument("--count-ops", action="store_true", help="count dispatched operators by phase, on the path a "
                    "GPU takes, instead of profiling times")
    ap.add_argument("--precision", choices=["auto", "no", "fp16", "bf16"], help="override the config's")
    ap.add_argument("--passes", type=int, choices=[1, 2, 3], default=1, help="with --count-ops: encoder passes a "
                    "step: 1 = queries, positives and negatives in one (a GPU's rule), 2 = the queries apart, 3 = each "
                    "group apart (the former steps), for comparison")
    args = ap.parse_args()
    require_beir(args.data)

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    import bench_quality as bq

    overrides = {"model.max_query_length": 16, "model.max_doc_length": 32} if args.quick else {}
    if args.precision:
        overrides["optim.mixed_precision"] = args.precision
    if args.quick:
        args.wait, args.active = 1, 2
    bq.ensure_triples(args.triples, args.data, 256, bq.is_distill(args.config))
    ends: list[float] = []

    steps = args.wait + 1 + args.active
    with tempfile.TemporaryDirectory(prefix="profile-train-") as tmp:
        cfg = bq.train_config(args.config, args.triples, Path(tmp), max_steps=steps + 1, overrides=overrides)
        if args.count_ops:
            return count_ops(cfg, args)
        with profile(activities=[ProfilerActivity.CPU],
                     schedule=schedule(wait=args.wait, warmup=1, active=args.active, repeat=1)) as prof:
            def stepped(*_: object) -> None:
                ends.append(time.perf_counter())
                prof.step()

            train_stepped(cfg, stepped)
    recorded = ends[args.wait + 1:args.wait + 1 + args.active]
    step_s = (recorded[-1] - ends[args.wait]) / len(recorded)
    header = (f"{len(recorded)} profiled steps of batch {cfg.optim.batch_size} at lengths "
              f"{cfg.model.max_query_length}/{cfg.model.max_doc_length}, {cfg.optim.mixed_precision} precision, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads: {step_s * 1000:.0f} ms a step "
              f"({cfg.optim.batch_size / step_s:.1f} samples/s, profiler on)")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    print(header)
    print(table)
    if args.output:
        args.output.write_text(header + "\n" + table + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


def train_stepped(cfg: object, stepped: Callable[..., None]) -> None:
    """``cfg``'s training run with ``stepped`` called after every optimizer step; exits unless it finished."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from splade_obs.run import run_training

    handle = register_optimizer_step_post_hook(stepped)
    try:
        result = run_training(cfg)
    finally:
        handle.remove()
    if result.status != "FINISHED":
        sys.exit(f"training ended {result.status}")


#: operators that make a view or alias of their input: no kernel runs on any device
VIEWS = frozenset({"view", "_unsafe_view", "t", "transpose", "expand", "detach", "unsqueeze", "squeeze", "slice",
                   "select", "permute", "alias", "as_strided", "split", "split_with_sizes", "chunk", "unbind",
                   "reshape", "lift_fresh", "_reshape_alias", "unfold", "diagonal"})
#: operators whose output size or value the host must read from the device: on a GPU each waits for the queue
SYNCS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "_unique2", "unique_dim",
                   "unique_consecutive", "bincount", "histc"})
#: boolean-mask indexing (``x[mask]``, ``x[mask] = v``): sized by the mask's count, read back from the device
MASK_INDEXED = frozenset({"index", "index_put_", "index_put", "_index_put_impl_"})
#: tensor methods that copy to the host without an operator the dispatch mode sees on a CPU tensor
HOST_COPIES = ("tolist", "numpy", "cpu")


def is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether operator ``name`` called with ``args`` / ``kwargs`` reads back from the device on a GPU."""
    if name == "repeat_interleave":  # sized by the repeats' sum unless the caller gives output_size
        return kwargs.get("output_size") is None
    if name in MASK_INDEXED and len(args) > 1 and isinstance(args[1], (list, tuple)):
        import torch
        return any(getattr(i, "dtype", None) in (torch.bool, torch.uint8) for i in args[1])  # masks, not indices
    return name in SYNCS


#: phase of an operator: the first of these functions found on its Python stack, innermost first
PHASES = (("_engine_run_backward", "backward"), ("encode_batch", "forward"), ("batch_loss", "loss"),
          ("_optimizer_step", "optimizer"))


def phase_of(frame: object) -> str:
    while frame is not None:
        for name, phase in PHASES:
            if frame.f_code.co_name == name:  # type: ignore[attr-defined]
                return phase
        frame = frame.f_back  # type: ignore[attr-defined]
    return "rest of the step"


@contextlib.contextmanager
def step_passes(passes: int | None) -> Iterator[None]:
    """Our trainer's steps with ``passes`` encoder passes (:func:`forced_passes`) inside the block; None: its rule."""
    import functools

    from splade_obs import objective

    rule = objective.pass_groups
    if passes is not None:
        objective.pass_groups = functools.partial(forced_passes, passes)
    try:
        yield
    finally:
        objective.pass_groups = rule


def forced_passes(passes: int, shapes: list[tuple[int, int]], device: object) -> list[list[int]]:
    """``objective.pass_groups`` with ``passes`` encoder passes a step (fewer when a step has fewer groups)."""
    every = list(range(len(shapes)))
    return {1: [every], 2: [[0], every[1:]] if len(every) > 1 else [every], 3: [[i] for i in every]}[passes]


def count_ops(cfg: object, args: argparse.Namespace) -> None:
    """Operators per step of the ``--active`` steps after ``--wait`` + 1, by phase, on the GPU's code path."""
    import collections
    import functools

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import splade_obs.dropout as dropout
    import splade_obs.model as model

    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    syncs: collections.Counter[tuple[str, str]] = collections.Counter()  # (phase, operator)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):  # noqa: ANN001, ANN204
            name, phase = func.overloadpacket.__name__, phase_of(sys._getframe(1))
            counts[phase, "views" if name in VIEWS else "kernels"] += 1
            if is_sync(name, a, kw or {}):
                syncs[phase, name] += 1
            return func(*a, **(kw or {}))

    def host_copy(name: str) -> Callable[..., object]:
        method = getattr(torch.Tensor, name)

        def copy(self: object, *a: object, **kw: object) -> object:
            syncs[phase_of(sys._getframe(1)), name] += 1
            return method(self, *a, **kw)
        return copy

    originals = {name: getattr(torch.Tensor, name) for name in HOST_COPIES}
    mode, steps = Count(), [0]

    def stepped(*_: object) -> None:
        steps[0] += 1
        if steps[0] == args.wait + 1:
            mode.__enter__()
            for name in HOST_COPIES:
                setattr(torch.Tensor, name, host_copy(name))
        elif steps[0] == args.wait + 1 + args.active:
            mode.__exit__(None, None, None)
            for name, method in originals.items():
                setattr(torch.Tensor, name, method)

    model.fused_splade_head = functools.partial(model.fused_splade_head, per_document=False)  # batch-wide, as a GPU
    dropout._fast = lambda *_: False  # torch's dropout and SDPA, as on a GPU
    dropout.reads_back = lambda *_: True  # the attention mask built as for a tensor on a GPU
    with step_passes(args.passes):  # whatever the lengths
        train_stepped(cfg, stepped)
    phases = [p for _, p in PHASES] + ["rest of the step"]
    rows = [(p, *(x / args.active for x in (counts[p, "kernels"], counts[p, "views"],
                                            sum(n for (q, _), n in syncs.items() if q == p))))
            for p in phases]
    rows.append(("step", *(sum(r[i] for r in rows) for i in (1, 2, 3))))
    passes = "one encoder pass" if args.passes == 1 else f"{args.passes} encoder passes"
    lines = [f"operators per step on the GPU's code path, {args.active} steps of batch {cfg.optim.batch_size} at "
             f"lengths {cfg.model.max_query_length}/{cfg.model.max_doc_length}, {cfg.optim.mixed_precision} precision, "
             f"{passes}",
             f"{'phase':<18}{'kernels':>10}{'views':>10}{'syncs':>10}"]
    lines += [f"{name:<18}{kernels:>10.1f}{views:>10.1f}{waits:>10.1f}" for name, kernels, views, waits in rows]
    lines += ["", "syncs per step (phase: operator):"]
    lines += [f"  {p}: {name} {n / args.active:.1f}" for (p, name), n in sorted(syncs.items())] or ["  none"]
    print("\n".join(lines))
    if args.output:
        args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
