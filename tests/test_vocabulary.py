"""One metric vocabulary: names declared next to their events, each sink mapping them by one rule, and the
generated table in docs/observability.md in step with the code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splade_obs import vocabulary
from splade_obs.bus import RecordingSink
from splade_obs.events import (METRIC_VOCABULARY, EpochDone, ErrorCaught, EvaluationDone, RunFinished, StepDone,
                               metric_def)
from splade_obs.run import run_training
from splade_obs.sinks.otel.attributes import span_kind

from tests._eval_utils import write_beir

DOC = Path(__file__).resolve().parents[1] / "docs" / "observability.md"


def test_the_generated_table_in_the_docs_is_current() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert vocabulary.splice(text) == text, "docs/observability.md is stale: run `python scripts/gen_docs.py`"


def test_the_table_lists_every_declared_name_once_with_each_sinks_key() -> None:
    from splade_obs.sinks.metrics_file import file_key
    from splade_obs.sinks.otel import attribute_name

    table = vocabulary.render()
    names = [m.name for _, m in METRIC_VOCABULARY]
    assert len(names) == len(set(names)), "a canonical name is declared twice"
    for name in names:
        assert f"| `{name}` |" in table
        assert f"`{attribute_name(name)}`" in table
    assert attribute_name("train/loss") == "splade.train.loss"
    assert [file_key(n) for n in ("epoch/loss", "val/loss", "epoch/lr", "epoch/duration_seconds")] == [
        "train_loss", "val_loss", "learning_rate", "epoch_duration_seconds"]   # the seed's keys


def test_the_training_loss_has_one_name_per_sink() -> None:
    """The quantity that had seven names: the step loss is train/loss; its epoch mean is epoch/loss."""
    names = [m.name for _, m in METRIC_VOCABULARY]
    assert "train/loss" in [m.name for m in StepDone.METRICS]
    assert not [n for n in names if "train_loss" in n or n.startswith("final/")]
    assert metric_def("epoch/loss") is not None and metric_def("final/train_loss") is None


@pytest.mark.slow
def test_a_real_run_reports_only_declared_names_and_the_sinks_map_them_by_their_rule(tiny_cfg, tmp_path):
    from mlflow import MlflowClient

    from splade_obs.sinks.metrics_file import file_key
    from splade_obs.sinks.otel import attribute_name

    beir = write_beir(tmp_path / "beir", split="dev")
    demo = Path(__file__).resolve().parents[1] / "splade_obs" / "demo" / "train.jsonl"
    val = tmp_path / "val.jsonl"
    val.write_text("".join(demo.read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    cfg = tiny_cfg(optim={"max_steps": 4, "mixed_precision": "no"}, data={"val_file": str(val)},
                   eval={"eval_data": str(beir), "eval_split": "dev", "eval_steps": 2},
                   recovery={"inject_faults": ["batch:2:data"]},
                   tracking={"enabled": True, "tracking_uri": uri}, tracing={"exporter": "file",
                                                                             "trace_batches": "all"})
    rec = RecordingSink()
    res = run_training(cfg, extra_sinks=[rec])
    assert res.status == "FINISHED"

    # every name any event reports is declared, and the declared step names all show up
    emitted: set[str] = set()
    for ev in rec.events:
        for name in ev.metrics():
            assert metric_def(name) is not None, f"{type(ev).__name__} reports undeclared {name}"
        if not (isinstance(ev, EpochDone) and not ev.complete):
            emitted |= set(ev.metrics())
    exact_step = {m.name for m in StepDone.METRICS if "{" not in m.name} - {"train/grad_scale"}
    assert exact_step <= emitted, exact_step - emitted
    for cls in (EpochDone, EvaluationDone, ErrorCaught, RunFinished):
        assert rec.of(cls), cls
    assert {"val/loss", "epoch/loss", "eval/ndcg_at_10", "errors/DATA_ERROR", "train/skipped_batches",
            "train/base"} <= emitted

    # MLflow: the canonical names as they are, nothing else (system/* are MLflow's own system metrics)
    run = MlflowClient(uri).get_run(res.ids.mlflow_run_id)
    assert {k for k in run.data.metrics if not k.startswith("system/")} == emitted

    # OpenTelemetry: span attributes for metrics are attribute_name(canonical) of that span's event
    spans = [json.loads(line) for line in (cfg.log_dir / "traces.jsonl").read_text().splitlines()]
    batch = [s for s in spans if span_kind(s["name"]) == "batch" and s["attributes"].get("splade.trace.keep_reason") != "failed"]
    steps = {e.step: e for e in rec.of(StepDone)}
    assert batch
    for span in batch:
        expected = {attribute_name(k) for k in steps[span["attributes"]["splade.step"]].metrics()}
        got = {k for k in span["attributes"] if k.startswith("splade.train.")}
        assert got == expected
    root = next(s for s in spans if s["parent_id"] is None)
    assert attribute_name("run/duration_seconds") in root["attributes"]

    # the metrics file: each epoch record holds every epoch metric under file_key(name)
    doc = json.loads((cfg.log_dir / "training_metrics.json").read_text())
    (epoch,) = rec.of(EpochDone)
    record = doc["metrics_by_epoch"]["1"]
    for name, value in epoch.metrics().items():
        assert record[file_key(name)] == pytest.approx(value), name
    assert record["train_loss"] == pytest.approx(epoch.means["epoch/loss"])
