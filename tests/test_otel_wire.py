"""Spans over the wire: a real ``splade-obs train`` exporting OTLP/HTTP to a real receiver on 127.0.0.1,
and the same run with the receiver down (bounded end of run, bounded close)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests._otlp_receiver import OtlpReceiver, free_port
from tests.conftest import TINY_ARGS
from splade_obs_cli.main import cli
from splade_obs.sinks.otel import OtelSink
from splade_obs.sinks.otel.attributes import span_kind

pytestmark = pytest.mark.server

SECRET = "hdr-secret-7c1e93"


def _train(tmp_path: Path, endpoint: str, name: str) -> tuple[object, float, Path]:
    out = tmp_path / name
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_HEADERS": f"x-test-auth={SECRET}",
           "OTEL_SERVICE_NAME": "splade-wire-test", "OTEL_SDK_DISABLED": "false"}
    args = ["train", *TINY_ARGS, "--max-steps", "4", "--output-dir", str(out), "--no-mlflow", "--progress", "none",
            "--otel-exporter", "otlp", "--trace-batches", "every:2"]
    t0 = time.monotonic()
    result = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    return result, time.monotonic() - t0, out


def test_receiver_gets_the_spans_of_a_real_run(tmp_path):
    with OtlpReceiver() as rx:
        result, _, out = _train(tmp_path, rx.endpoint, "up")
        assert result.exit_code == 0, result.output
        # close() flushed before the command returned: everything is already there
        spans = rx.snapshot()
    names = [s.name for s in spans]
    assert names.count("train") == 1
    (root,) = [s for s in spans if s.name == "train"]
    assert root.parent_span_id == "" and root.resource["service.name"] == "splade-wire-test"
    assert root.attributes["splade.model.name"] == "splade-tiny" and root.attributes["splade.status"] == "FINISHED"
    batches = [s for s in spans if span_kind(s.name) == "batch"]
    assert sorted(b.attributes["splade.step"] for b in batches) == [1, 2, 4]   # the first batch, then every:2
    assert all(b.name == f"batch {b.attributes['splade.step']}" for b in batches)
    assert all(b.attributes["splade.train.loss"] > 0 for b in batches)     # metrics by the one naming rule
    epochs = {s.span_id for s in spans if s.name == "epoch"}
    assert epochs and all(b.parent_span_id in epochs for b in batches)
    assert {s.trace_id for s in spans} == {root.trace_id}
    # the OTLP headers went to the collector ...
    assert rx.requests and all(h.get("x-test-auth") == SECRET for h in rx.requests)
    # ... and nowhere else: not in logs, traces.jsonl, metrics, checkpoints
    for f in out.rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000:
            assert SECRET.encode() not in f.read_bytes(), f
    # the local file has the same trace
    assert root.trace_id in (out / "logs" / "traces.jsonl").read_text()


def test_dead_collector_costs_the_run_nothing_and_close_is_bounded(tmp_path, monkeypatch):
    closes: list[float] = []
    original = OtelSink.close

    def timed_close(self, timeout: float = 5.0) -> None:     # instrumentation only: the real close runs
        t0 = time.monotonic()
        original(self, timeout)
        closes.append(time.monotonic() - t0)

    monkeypatch.setattr(OtelSink, "close", timed_close)
    with OtlpReceiver() as rx:
        up, t_up, _ = _train(tmp_path, rx.endpoint, "up")
    dead = f"http://127.0.0.1:{free_port()}"                 # nothing listens there
    down, t_down, out = _train(tmp_path, dead, "down")
    assert up.exit_code == 0 and down.exit_code == 0, down.output
    assert len(closes) == 2
    print(f"run up {t_up:.2f}s, down {t_down:.2f}s; close up {closes[0]:.2f}s, down {closes[1]:.2f}s")
    assert closes[1] <= 5.0 + 0.5                            # OtelOptions.shutdown_timeout + slack
    assert t_down <= t_up + 5.0, (t_up, t_down)
    # the run itself finished and its trace is still complete on disk
    local = [json.loads(line) for line in (out / "logs" / "traces.jsonl").read_text().splitlines()]
    assert [s["name"] for s in local].count("train") == 1 and any(span_kind(s["name"]) == "batch" for s in local)
