"""Multi-node training as users run it (issue 34.3): two torchrun "nodes" on this machine, each its own
``torchrun --nnodes 2 --node-rank N --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT``
invocation (gloo, CPU), sharing the output folder and a sqlite MLflow store by path, as real nodes share a
file system and a tracking server.

Real parts only: real torchrun agents and rendezvous, the real splade-tiny model, a sqlite store; one node's
process group is killed with SIGKILL as a machine failure would end it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests._mlflow_utils import free_port
from tests._torchrun import kill_node, node_logs, nodes, run_nodes, torchrun_env, wait_nodes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: dropout on (the default): exactness then needs every rank's RNG stream, not only the data order
ARGS = ["train", "--max-steps", "4", "--save-steps", "2", "--batch-size", "2", "--max-query-length", "16",
        "--max-doc-length", "32", "--val-file", "none", "--eval-data", "none", "--learning-rate", "2e-4",
        "--seed", "11", "--mixed-precision", "no", "--progress", "none", "--no-log-model"]


def _env():
    from splade_obs.sinks.mlflow import env
    return torchrun_env(drop=env.ENV_VARS, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.5")


def _weights(out: Path):
    from safetensors.torch import load_file
    return load_file(str(out / "final" / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _runs(uri: str, name: str):
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      f"tags.mlflow.runName = '{name}'")


def _spans(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """The uninterrupted two-node run: 4 steps, a checkpoint every 2, MLflow and the trace file on."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    uri = f"sqlite:///{tmp}/m.db"
    args = [*ARGS, "--output-dir", str(tmp / "out"), "--tracking-uri", uri, "--experiment-name", "mn",
            "--run-name", "two-nodes"]
    codes = run_nodes(tmp, free_port(), args, env=_env(), timeout=240)
    assert codes == [0, 0], node_logs(tmp)
    return {"tmp": tmp, "uri": uri, "out": tmp / "out"}


def test_two_nodes_train_to_the_one_node_weights_in_one_run_and_one_trace(two_nodes, tmp_path):
    # the same two ranks on one node (one torchrun, 2 processes): bit-identical weights
    one = tmp_path / "one"
    codes = run_nodes(tmp_path, free_port(), [*ARGS, "--output-dir", str(one), "--no-mlflow", "--otel-exporter",
                                              "none"], nnodes=1, nproc=2, env=_env(), timeout=240)
    assert codes == [0], node_logs(tmp_path)
    assert _same(_weights(two_nodes["out"]), _weights(one))

    # one MLflow run, with the global batch and both nodes' system metrics
    client, runs = _runs(two_nodes["uri"], "two-nodes")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["splade.world_size"] == "2"
    assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                                   key=lambda m: m.step)] == [1, 2, 3, 4]
    keys = set(run.data.metrics)
    assert {f"system/node_{n}/cpu_utilization_percentage" for n in (0, 1)} <= keys, sorted(keys)

    # one trace: each rank's spans in its own file, rank 1's train span a child of rank 0's
    logs = two_nodes["out"] / "logs"
    per_rank = {0: _spans(logs / "traces.jsonl"), 1: _spans(logs / "traces.rank1.jsonl")}
    assert all(per_rank.values())
    assert len({s["context"]["trace_id"] for spans in per_rank.values() for s in spans}) == 1
    roots = {r: next(s for s in spans if s["name"] == "train") for r, spans in per_rank.items()}
    assert roots[1]["parent_id"] == roots[0]["context"]["span_id"]
    assert roots[0]["attributes"]["mlflow.run_id"] == run.info.run_id
    # rank 0 owns checkpoints, saved with both ranks' RNG state
    ckpt = two_nodes["out"] / "checkpoints" / "checkpoint-4"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert (ckpt / "rng_ranks.pt").exists()


def test_resume_auto_after_one_node_is_killed_brings_both_back_exactly(two_nodes, tmp_path):
    """Node 1 dies (SIGKILL to its agent and worker) during step 3, after checkpoint-2: node 0 exits on its own
    (``--max-restarts 0``); both invocations rerun with ``--resume auto`` end with the uninterrupted weights,
    in the same MLflow run."""
    out, uri = tmp_path / "out", two_nodes["uri"]
    args = [*ARGS, "--output-dir", str(out), "--tracking-uri", uri, "--experiment-name", "mn", "--run-name", "killed"]
    with nodes(tmp_path, free_port(), [*args, "--inject-fault", "step:3-4:slow"], env=_env(), tag="-a") as procs:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "checkpoint-2").is_dir():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), node_logs(tmp_path, "-a")
            time.sleep(0.1)
        kill_node(procs[1])
        codes = wait_nodes(procs, 120)
        assert codes[0] not in (None, 0), node_logs(tmp_path, "-a")  # node 0 stopped by itself, failing
    assert not (out / "final").exists()
    assert not (out / "checkpoints" / "checkpoint-4").exists()

    codes = run_nodes(tmp_path, free_port(), [*args, "--resume", "auto"], env=_env(), timeout=240, tag="-b")
    assert codes == [0, 0], node_logs(tmp_path, "-b")
    assert _same(_weights(out), _weights(two_nodes["out"]))

    client, runs = _runs(uri, "killed")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in runs]
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert set(steps) == {1, 2, 3, 4}



def test_a_stop_signal_on_one_rank_stops_both_after_the_same_step_and_resumes_exactly(two_nodes, tmp_path):
    """SIGTERM reaches rank 1 only (as when one node's agent stops its workers) after step 3: the ranks agree
    to stop after that step, the stop checkpoint holds both ranks' RNG state, and the resumed run ends with the
    uninterrupted run's weights."""
    import torch

    out = tmp_path / "out"
    args = [*ARGS, "--output-dir", str(out), "--no-mlflow", "--otel-exporter", "none"]
    codes = run_nodes(tmp_path, free_port(), [*args, "--inject-fault", "rank1:step:3:sigterm"], env=_env(),
                      timeout=240, tag="-a")
    assert all(c not in (None, 0) for c in codes), node_logs(tmp_path, "-a")
    for node in (0, 1):  # each rank stopped (exit 130 after the same step), none failed
        assert "run stopped (interrupted by SIGTERM)" in (tmp_path / f"node{node}-a.log").read_text(), node_logs(
            tmp_path, "-a")
    ckpt = out / "checkpoints" / "checkpoint-3"
    assert json.loads((ckpt / "trainer_state.json").read_text())["reason"] == "interrupt"
    assert len(torch.load(ckpt / "rng_ranks.pt", weights_only=True)) == 2
    codes = run_nodes(tmp_path, free_port(), [*args, "--resume", "auto"], env=_env(), timeout=240, tag="-b")
    assert codes == [0, 0], node_logs(tmp_path, "-b")
    assert _same(_weights(out), _weights(two_nodes["out"]))

def test_a_stop_right_after_a_save_point_keeps_that_checkpoints_every_rank_rng(tmp_path):
    """Node 0's agent SIGTERMs its worker when it loses the other node; when that lands right after a save
    point, the stop's checkpoint (rank 0's RNG only) must not replace the one with every rank's RNG state."""
    from splade_obs.checkpointing import Checkpointer
    from splade_obs.config import TrainConfig

    cfg = TrainConfig.from_mapping({"checkpoint": {"output_dir": str(tmp_path / "out")}})
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "rng_ranks.pt").write_bytes(b"every rank")
    events: list = []

    class TwoRanks:  # what Checkpointer.save asks of the torchrun context on a stop: nothing but its presence
        world_size = 2

    class Writing(Exception):
        pass

    def before_write():  # the Checkpointer calls it right before it writes a checkpoint
        raise Writing

    saver = Checkpointer(cfg, events.append, rank=0, dist=TwoRanks(), barrier=before_write)
    saver.parts = {"encoder": None}
    saver.save("interrupt", step=2, epoch=1, rng={}, trainer_state={"global_step": 2})
    assert sorted(p.name for p in ckpt.iterdir()) == ["rng_ranks.pt"] and saver.last == str(ckpt)
    assert not events
    with pytest.raises(Writing):  # a stop at a step without such a checkpoint still writes its own
        saver.save("interrupt", step=3, epoch=1, rng={}, trainer_state={"global_step": 3})


def test_resume_with_a_node_local_output_folder_is_refused_naming_each_ranks_checkpoint(two_nodes, tmp_path):
    """Node 1 does not see node 0's output folder (each has its own): rank 1 would start from step 0 while rank 0
    continues, so both stop before training with a CONFIG_ERROR naming what each rank found."""
    import shutil

    local = [tmp_path / "node0-out", tmp_path / "node1-out"]
    shutil.copytree(two_nodes["out"] / "checkpoints", local[0] / "checkpoints")
    args = [[*ARGS, "--output-dir", str(out), "--no-mlflow", "--otel-exporter", "none", "--resume", "auto"]
            for out in local]
    codes = run_nodes(tmp_path, free_port(), args, rdzv="static", env=_env(), timeout=240)
    text = node_logs(tmp_path)
    assert all(c not in (None, 0) for c in codes), text
    for node, out in enumerate(local):  # each node names its own folder
        assert (f"error[CONFIG_ERROR]: {out}: the ranks found different checkpoints to resume from "
                "(rank 0: checkpoint-4, rank 1: none)") in (tmp_path / f"node{node}.log").read_text(), text
    assert not (local[1] / "checkpoints").exists() and not (local[0] / "final").exists()
