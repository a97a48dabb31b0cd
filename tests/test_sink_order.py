"""Sinks consume events only: built in any order they give the same MLflow run and the same span tree, and the
ids one sink creates reach the others as events."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from splade_obs.run import build_sinks, run_training

SINKS = Path(__file__).resolve().parents[1] / "splade_obs" / "sinks"
#: metrics whose values depend on the clock, not on the training
TIMED = ("_seconds", "_per_second")


def test_no_sink_module_reads_the_config() -> None:
    """What a sink needs arrives in events (or as plain options from run.build_sinks), never as TrainConfig."""
    for path in SINKS.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = {a.name for a in node.names}
                assert not (node.module or "").endswith("config") or not names & {"TrainConfig"}, path
                assert "TrainConfig" not in names, path
            if isinstance(node, ast.Attribute) and node.attr == "cfg":
                pytest.fail(f"{path} reads .cfg")


def _run(tmp_path: Path, tiny_cfg, name: str, reverse: bool):
    uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
    cfg = tiny_cfg(checkpoint={"output_dir": str(tmp_path / name / "out")},
                   optim={"max_steps": 3, "mixed_precision": "no"}, model={"dropout": 0.0},
                   tracking={"enabled": True, "tracking_uri": uri, "run_name": "same-name"},
                   tracing={"exporter": "file", "trace_batches": "all"})
    sinks = build_sinks(cfg, run_name="same-name")
    res = run_training(cfg, sinks=list(reversed(sinks)) if reverse else sinks, run_name="same-name")
    assert res.status == "FINISHED"
    spans = [json.loads(line) for line in (cfg.log_dir / "traces.jsonl").read_text().splitlines()]
    return uri, res, spans


def _mlflow_view(uri: str, run_id: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    metrics = {}
    for key in run.data.metrics:
        if key.startswith("system/"):
            continue  # samples of the machine, different in every run
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        timed = key.endswith(TIMED)
        metrics[key] = [(m.step, None if timed else round(m.value, 6)) for m in hist]
    variable = ("otel.trace_id", "mlflow.note.content", "splade.output_dir", "splade.last_checkpoint_path",
                "splade.tracking_uri", "splade.model_path")
    tags = {k: v for k, v in run.data.tags.items() if k not in variable and not k.startswith("mlflow.")}
    params = {k: v for k, v in run.data.params.items() if "output_dir" not in k and "tracking_uri" not in k
              and "log_dir" not in k}
    artifacts = sorted(a.path for a in client.list_artifacts(run_id))
    return {"metrics": metrics, "tags": tags, "params": params, "artifacts": artifacts,
            "status": run.info.status, "name": run.info.run_name}


def _span_tree(spans: list[dict]) -> list:
    by_id = {s["context"]["span_id"]: s for s in spans}

    def path(s: dict) -> str:
        parent = by_id.get(s["parent_id"]) if s["parent_id"] else None
        return (path(parent) + "/" if parent else "") + s["name"]

    def loss(s: dict) -> float | None:
        value = s["attributes"].get("splade.train.loss")
        return None if value is None else round(value, 6)

    # the same spans, the same parents, the same attribute names, the same training values
    return sorted((path(s), s["attributes"].get("splade.step", -1), sorted(s["attributes"]), loss(s)) for s in spans)


@pytest.mark.slow
def test_sinks_built_in_two_orders_give_the_same_run_and_trace(tiny_cfg, tmp_path):
    uri_a, res_a, spans_a = _run(tmp_path, tiny_cfg, "a", reverse=False)
    uri_b, res_b, spans_b = _run(tmp_path, tiny_cfg, "b", reverse=True)

    view_a, view_b = _mlflow_view(uri_a, res_a.ids.mlflow_run_id), _mlflow_view(uri_b, res_b.ids.mlflow_run_id)
    assert view_a == view_b
    assert "train/loss" in view_a["metrics"] and view_a["status"] == "FINISHED"
    assert _span_tree(spans_a) == _span_tree(spans_b)

    # in both orders each sink learned the other's id from the id events
    from mlflow import MlflowClient

    for uri, res, spans in ((uri_a, res_a, spans_a), (uri_b, res_b, spans_b)):
        root = next(s for s in spans if s["parent_id"] is None)
        assert root["attributes"]["mlflow.run_id"] == res.ids.mlflow_run_id
        assert root["context"]["trace_id"] == "0x" + res.ids.trace_id
        assert MlflowClient(uri).get_run(res.ids.mlflow_run_id).data.tags["otel.trace_id"] == res.ids.trace_id
