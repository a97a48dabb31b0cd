"""Length bucketing (``data.length_buckets``): batches of similar length, the same epoch, an order that follows
the seed, torchrun's global batches equal to one process's, and a resumed run that replays it exactly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splade_obs.bus import RecordingSink
from splade_obs.events import RunStarted, StepDone
from splade_obs.plan import epoch_batches, example_length
from splade_obs.records import Example
from splade_obs.run import run_training


def _examples(n: int = 400, seed: int = 3) -> list[Example]:
    rng = random.Random(seed)
    return [Example(query=f"q{i}", positives=("w " * rng.choice([rng.randint(5, 40), rng.randint(100, 400)]),))
            for i in range(n)]


def _padded(examples: list[Example], batches: list[list[int]]) -> int:
    """Characters a batch pads to, summed: what bucketing saves."""
    return sum(len(b) * max(example_length(examples[i]) for i in b) for b in batches)


def test_buckets_cut_padding_and_keep_the_epoch() -> None:
    examples = _examples()
    plain, _ = epoch_batches(examples, 1, batch_size=8, seed=11)
    bucketed, _ = epoch_batches(examples, 1, batch_size=8, seed=11, bucket_batches=10)
    flat = [i for b in bucketed for i in b]
    assert all(len(b) == 8 for b in bucketed) and len(flat) == len(set(flat)) == 400 == len(plain) * 8
    assert _padded(examples, bucketed) < 0.75 * _padded(examples, plain)
    def median_spread(batches: list[list[int]]) -> int:
        spreads = sorted(max(example_length(examples[i]) for i in b) - min(example_length(examples[i]) for i in b)
                         for b in batches)
        return spreads[len(spreads) // 2]

    assert median_spread(bucketed) < 0.2 * median_spread(plain)  # a batch holds similar lengths
    tops = [max(example_length(examples[i]) for i in b) for b in bucketed]
    assert tops != sorted(tops) and tops != sorted(tops, reverse=True)  # still shuffled from batch to batch


def test_the_bucketed_order_follows_only_the_seed_and_epoch() -> None:
    examples = _examples()
    again = lambda **kw: epoch_batches(examples, **{"epoch": 2, "batch_size": 8, "seed": 5,  # noqa: E731
                                                    "bucket_batches": 6, **kw})[0]
    assert again() == again()  # what a resumed run computes
    assert again() != again(epoch=3) and again() != again(seed=6)
    ranks = [again(rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 25
    # under torchrun a global batch is the one-process batch of the global size, bucketed or not
    single = again(batch_size=16)
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(b) for b in single]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_a_bucketed_run_resumes_to_the_same_weights(tiny_cfg, tmp_path) -> None:
    """Killed after step 3 of 6 and resumed with --resume auto: the same batches, losses and final weights as
    the uninterrupted bucketed run, which itself trains on other batches than the unbucketed one."""
    common = {"optim": {"max_steps": 6, "learning_rate": 3e-4}, "data": {"length_buckets": 3}}
    rec_straight, rec_plain = RecordingSink(), RecordingSink()
    assert run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "a")}, **common),
                        extra_sinks=[rec_straight]).status == "FINISHED"
    assert run_training(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "p")}, optim=common["optim"]),
                        extra_sinks=[rec_plain]).status == "FINISHED"
    broken = tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b")},
                      recovery={"inject_faults": ("step:3:interrupt",)}, **common)
    assert run_training(broken).status == "KILLED"
    rec = RecordingSink()
    resumed = tiny_cfg(checkpoint={"output_dir": str(tmp_path / "b"), "resume": "auto"}, **common)
    assert run_training(resumed, extra_sinks=[rec]).status == "FINISHED"
    assert rec.of(RunStarted)[0].start_step == 3
    straight = [e.loss for e in rec_straight.of(StepDone)]
    assert [e.loss for e in rec.of(StepDone)] == straight[3:]
    assert straight != [e.loss for e in rec_plain.of(StepDone)]  # bucketing did change the batches
    wa, wb = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("value", ["-1", "x"])
def test_a_bad_length_buckets_flag_is_a_config_error(tmp_path, value) -> None:
    from click.testing import CliRunner

    from splade_obs.errors import EXIT_CODES, ErrorCategory
    from splade_obs_cli.main import cli

    res = CliRunner().invoke(cli, ["train", "--output-dir", str(tmp_path / "o"), "--length-buckets", value])
    assert res.exit_code in (2, EXIT_CODES[ErrorCategory.CONFIG_ERROR]) and "length-buckets" in res.stderr.replace(
        "length_buckets", "length-buckets")
