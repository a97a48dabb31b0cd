"""Logging layer: console/plain/JSON logs, redaction, metrics file, errors file, progress, end-to-end runs."""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from pathlib import Path

import pytest

from splade_obs import atomic
from splade_obs.bus import EventBus, RecordingSink, Sink
from splade_obs.events import RunFinished, SinkDegraded, StepDone
from splade_obs.logging_setup import setup_logging, teardown_logging
from splade_obs.sinks.console import LogSink
from splade_obs.sinks.errors_file import ErrorsFileSink
from splade_obs.sinks.metrics_file import MetricsFileSink
from splade_obs.sinks.progress import ProgressSink

from tests._logging_utils import (ANSI, COMPLETED_RE, CONSOLE_RE, PROGRESS_RE, all_file_text, check_json_log_line,
                                 partial_epoch,
                             check_metrics_file, epoch_events, full_run, read_json_lines, run_started)

SECRET = "sk-planted-123"
PASSWORD = "hunter2-planted-pw"


@pytest.fixture(autouse=True)
def _clean_logging():
    yield
    teardown_logging()


class TtyStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


# ------------------------------------------------------------------------------------------ log files
def test_json_log_schema_and_library_loggers(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    setup_logging("INFO", log_dir, json_logs=True)
    log = logging.getLogger("splade_obs.train")
    log.info("Epoch %d/%d", 1, 3, extra={"step": 5, "epoch": 1})
    log.warning("skipped", extra={"step": 6, "epoch": 1, "category": "DATA_ERROR", "context": {"line_number": 3}})
    logging.getLogger("transformers").warning("library warning from transformers")
    logging.getLogger("opentelemetry.sdk").warning("library warning from otel")
    logging.getLogger("urllib3.connectionpool").warning("library warning from urllib3")
    import mlflow  # noqa: F401 - mlflow installs its own handler on import unless told not to

    logging.getLogger("mlflow.tracking").warning("library warning from mlflow")
    warnings.warn("captured python warning", UserWarning)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    log.debug("not at INFO")
    teardown_logging()

    docs = read_json_lines(log_dir / "train_splade.jsonl")
    for doc in docs:
        check_json_log_line(doc)
    by_msg = {d["message"]: d for d in docs}
    epoch = by_msg["Epoch 1/3"]
    assert (epoch["step"], epoch["epoch"], epoch["level"], epoch["name"], epoch["rank"]) == (5, 1, "INFO",
                                                                                           "splade_obs.train", 0)
    assert epoch["module"] == "test_logging_layer" and epoch["function"].startswith("test_json_log_schema")
    skipped = by_msg["skipped"]
    assert skipped["category"] == "DATA_ERROR" and skipped["context"] == {"line_number": 3}
    assert "ValueError: boom" in by_msg["failed"]["exception"]
    assert "not at INFO" not in by_msg
    plain = (log_dir / "train_splade.log").read_text()
    for lib in ("transformers", "otel", "urllib3", "mlflow"):
        assert f"library warning from {lib}" in by_msg or any(f"from {lib}" in m for m in by_msg), lib
        assert f"library warning from {lib}" in plain
    assert any("captured python warning" in m for m in by_msg)
    assert "captured python warning" in plain


def test_rank_files_and_no_console_on_other_ranks(tmp_path: Path, capsys) -> None:
    setup_logging("INFO", tmp_path, json_logs=True, rank=1, world_size=2)
    logging.getLogger("splade_obs.train").info("hello from rank 1")
    teardown_logging()
    assert capsys.readouterr().err == ""
    docs = read_json_lines(tmp_path / "train_splade.rank1.jsonl")
    assert docs[0]["rank"] == 1 and docs[0]["message"] == "hello from rank 1"
    assert (tmp_path / "train_splade.rank1.log").exists()
    assert not (tmp_path / "train_splade.jsonl").exists()


def test_teardown_removes_handlers(tmp_path: Path) -> None:
    before = list(logging.getLogger().handlers)
    setup_logging("INFO", tmp_path, json_logs=True)
    setup_logging("INFO", tmp_path, json_logs=True)  # a second call replaces, not duplicates
    assert len(logging.getLogger().handlers) == len(before) + 3
    teardown_logging()
    assert logging.getLogger().handlers == before


def test_transformers_progress_bars_are_off_during_a_run_and_back_after() -> None:
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    setup_logging("INFO", None)
    setup_logging("INFO", None)  # configuring again keeps them off and still restores them once
    assert not hf_logging.is_progress_bar_enabled()  # its tqdm bars would garble the non-TTY progress lines
    teardown_logging()
    assert hf_logging.is_progress_bar_enabled()


# ------------------------------------------------------------------------------------------ console
def _console_lines(monkeypatch, stream: io.StringIO, color: bool | None) -> list[str]:
    monkeypatch.setattr("sys.stderr", stream)
    setup_logging("INFO", None, color=color)
    log = logging.getLogger("splade_obs.train")
    log.info("Epoch 1/3")
    log.warning("careful")
    teardown_logging()
    return stream.getvalue().splitlines()


def test_console_format_without_color(monkeypatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    lines = _console_lines(monkeypatch, TtyStringIO(), color=None)  # a TTY, but NO_COLOR wins
    assert len(lines) == 2
    assert CONSOLE_RE.match(lines[0]) and lines[0].endswith(" - Epoch 1/3")
    assert lines[1].startswith("[WARNING] ")
    assert all(ANSI not in line for line in lines)


def test_console_not_a_tty_has_no_color(monkeypatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    lines = _console_lines(monkeypatch, io.StringIO(), color=None)
    assert lines and all(ANSI not in line for line in lines)
    assert CONSOLE_RE.match(lines[0])


def test_console_colors_on_tty_or_forced(monkeypatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    tty_lines = _console_lines(monkeypatch, TtyStringIO(), color=None)
    assert all(ANSI in line for line in tty_lines)
    monkeypatch.setenv("NO_COLOR", "1")
    forced = _console_lines(monkeypatch, io.StringIO(), color=True)
    assert all(line.startswith(ANSI) for line in forced)
    assert "[INFO]" in forced[0] and "Epoch 1/3" in forced[0]


def test_log_sink_lines(tmp_path: Path, capsys) -> None:
    setup_logging("INFO", tmp_path, json_logs=True, color=False)
    bus = EventBus([LogSink(every_n_steps=2)])
    for ev in full_run(tmp_path, epochs=2, steps_per_epoch=3):
        bus.emit(ev)
    bus.close()
    teardown_logging()
    err = capsys.readouterr().err.splitlines()
    assert all(CONSOLE_RE.match(line) for line in err), err
    msgs = [line.split(" - ", 1)[1] for line in err]
    assert "Epoch 1/2" in msgs and "Epoch 2/2" in msgs
    step_lines = [m for m in msgs if m.startswith("Step ")]
    assert [m.split()[1] for m in step_lines] == ["1/6", "2/6", "4/6", "6/6"]   # throttled: 1st, every 2nd, last
    assert any(m.startswith("Epoch 1/2 done: epoch/loss=1.222 val/loss=0.7") for m in msgs), msgs
    skipped = [line for line in err if "skipped batch [DATA_ERROR]" in line]
    assert len(skipped) == 1 and skipped[0].startswith("[WARNING]") and "train.jsonl:17" in skipped[0]
    assert msgs[-1].startswith("Run finished with status FINISHED at step 6")
    docs = read_json_lines(tmp_path / "train_splade.jsonl")
    for d in docs:
        check_json_log_line(d)
    assert [d["step"] for d in docs if d.get("event") == "step_done"] == [1, 2, 4, 6]
    err_doc = next(d for d in docs if d.get("event") == "error_caught")
    assert err_doc["category"] == "DATA_ERROR" and err_doc["context"]["line_number"] == 17


# ------------------------------------------------------------------------------------------ metrics file
def test_metrics_file_schema(tmp_path: Path) -> None:
    bus = EventBus([MetricsFileSink(tmp_path)])
    for ev in full_run(tmp_path, epochs=2, steps_per_epoch=3):
        bus.emit(ev)
    bus.close()
    doc = json.loads((tmp_path / "training_metrics.json").read_text())
    check_metrics_file(doc, finished=True)
    assert doc["status"] == "FINISHED" and set(doc["metrics_by_epoch"]) == {"1", "2"}
    ep1 = doc["metrics_by_epoch"]["1"]
    assert ep1["train_loss"] == pytest.approx((2.0 / 1 + 2.0 / 2 + 2.0 / 3) / 3)   # the seed's key for epoch/loss
    assert ep1["val_loss"] == 0.7 and ep1["skipped_batches"] == 1
    assert ep1["learning_rate"] == pytest.approx((1e-4 / 1 + 1e-4 / 2 + 1e-4 / 3) / 3)
    assert ep1["base"] == pytest.approx((1.5 / 1 + 1.5 / 2 + 1.5 / 3) / 3)     # mean of the epoch's steps
    assert ep1["epoch_duration_seconds"] == 1.5 and ep1["retrieval_flops"] == 3.0
    assert ep1["complete"] is True and ep1["step"] == 3
    assert [e["step"] for e in doc["eval"]] == [3, 6] and doc["eval"][0]["metrics"]["ndcg_at_10"] == 0.3
    assert doc["final_metrics"] == {"train_loss": 0.5, "ndcg_at_10": 0.3}
    assert doc["counters"] == {"skipped_batches": 1, "DATA_ERROR": 1}
    assert doc["errors_by_category"] == {"DATA_ERROR": 1}
    assert json.loads((tmp_path / "system_info.json").read_text())["python_version"] == "3.x"


def test_metrics_file_is_valid_json_at_every_point_and_after_a_crash(tmp_path: Path) -> None:
    sink = MetricsFileSink(tmp_path)
    path = tmp_path / "training_metrics.json"
    events = [run_started(tmp_path, 6, 2), *epoch_events(1, 2, 3), *epoch_events(2, 2, 3, finish=False)]
    for ev in events:  # feed directly: the "process" dies after epoch 2 started, no RunFinished, no close
        sink.handle(ev)
        json.loads(path.read_text())                     # never a half-written file
    doc = json.loads(path.read_text())
    check_metrics_file(doc, finished=False)
    assert doc["status"] == "RUNNING" and list(doc["metrics_by_epoch"]) == ["1"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_crash_during_write_keeps_previous_file(tmp_path: Path, monkeypatch) -> None:
    sink = MetricsFileSink(tmp_path)
    for ev in [run_started(tmp_path, 6, 2), *epoch_events(1, 2, 3)]:
        sink.handle(ev)
    before = (tmp_path / "training_metrics.json").read_text()

    def crash(src, dst):  # noqa: ANN001 - fault injection: the process dies between write and rename
        raise OSError("disk vanished")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError):
        for ev in epoch_events(2, 2, 3):
            sink.handle(ev)
    assert (tmp_path / "training_metrics.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # temp file cleaned up


def test_killed_run_records_partial_epoch_and_resume_continues(tmp_path: Path) -> None:
    bus = EventBus([MetricsFileSink(tmp_path)])
    started = epoch_events(2, 2, 3, finish=False)[:2]
    for ev in [run_started(tmp_path, 6, 2), *epoch_events(1, 2, 3), *started]:
        bus.emit(ev)
    bus.emit(partial_epoch([started[1]], 2, 2))   # the trainer reports the partial epoch when it stops
    bus.emit(RunFinished(status="KILLED", step=4, duration_seconds=2.0))
    bus.close()
    doc = json.loads((tmp_path / "training_metrics.json").read_text())
    check_metrics_file(doc, finished=True)
    assert doc["status"] == "KILLED" and doc["last_step"] == 4
    assert doc["metrics_by_epoch"]["2"]["complete"] is False and doc["metrics_by_epoch"]["2"]["steps_completed"] == 1

    bus = EventBus([MetricsFileSink(tmp_path)])
    for ev in [run_started(tmp_path, 6, 2, resumed=True, start_step=3), *epoch_events(2, 2, 3)]:
        bus.emit(ev)
    bus.emit(RunFinished(status="FINISHED", step=6, duration_seconds=2.0))
    bus.close()
    resumed = json.loads((tmp_path / "training_metrics.json").read_text())
    check_metrics_file(resumed, finished=True)
    assert resumed["start_time"] == doc["start_time"] and resumed["status"] == "FINISHED"
    assert resumed["metrics_by_epoch"]["1"] == doc["metrics_by_epoch"]["1"]
    assert resumed["metrics_by_epoch"]["2"]["complete"] is True
    assert resumed["duration_seconds"] >= doc["duration_seconds"] and len(resumed["resumed_at"]) == 1


def test_metrics_file_after_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """The file is written at each checkpoint and every ``interval`` seconds (last_step current); a run killed
    with SIGKILL (no RunFinished, no close) after step 7 and resumed from its checkpoint at step 6 ends with the
    file an uninterrupted run writes: what came after the checkpoint (an error, an evaluation, last_step) is cut
    back and made again once; a checkpoint or evaluation made again is recorded once."""
    from splade_obs.errors import DataError
    from splade_obs.events import CheckpointSaved, ErrorCaught, EvaluationDone

    from tests._logging_utils import step

    def error(n: int) -> ErrorCaught:
        return ErrorCaught.from_error(DataError("bad record", file_path="train.jsonl"), step=n, epoch=2,
                                      skipped_batch=True)

    def run_events(first: int) -> list:
        """Epoch 2 of a 2x4-step run from step ``first`` + 1: a checkpoint at 6, an error and an evaluation at 7."""
        evs: list = []
        for n in range(first + 1, 9):
            evs.append(step(n, 2, 8))
            if n == 6:
                evs.append(CheckpointSaved(step=6, epoch=2, path="ckpt-6", reason="save_steps", duration_seconds=0.1))
            if n == 7:
                evs += [error(7), EvaluationDone(step=7, epoch=2, split="test", scores={"ndcg@10": 0.4},
                                                 duration_seconds=0.5)]
        evs += [epoch_events(2, 2, 4)[-3], CheckpointSaved(step=8, epoch=2, path="ckpt-8", reason="epoch_end",
                                                           duration_seconds=0.1)]
        return evs

    start = [run_started(tmp_path, 8, 2), *epoch_events(1, 2, 4, skip_batch=True)]
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    bus = EventBus([MetricsFileSink(straight_dir)])
    for ev in [*start, *run_events(4), RunFinished(status="FINISHED", step=8, duration_seconds=3.0)]:
        bus.emit(ev)
    bus.close()

    sink = MetricsFileSink(killed_dir, interval=0.0)  # fed directly: the process dies after step 7, no close
    for ev in [*start, *run_events(4)[:6]]:
        sink.handle(ev)
    killed = json.loads((killed_dir / "training_metrics.json").read_text())
    assert killed["last_step"] == 7 and killed["status"] == "RUNNING"
    assert killed["errors_by_category"] == {"DATA_ERROR": 2} and len(killed["eval"]) == 2
    assert [(c["step"], c.get("errors_by_category")) for c in killed["checkpoints"]] == [
        (4, {"DATA_ERROR": 1}), (6, {"DATA_ERROR": 1})]

    bus = EventBus([MetricsFileSink(killed_dir)])
    replayed = CheckpointSaved(step=6, epoch=2, path="ckpt-6", reason="save_steps", duration_seconds=0.1)
    for ev in [run_started(killed_dir, 8, 2, resumed=True, start_step=6), replayed, *run_events(6),
               RunFinished(status="FINISHED", step=8, duration_seconds=2.0)]:
        bus.emit(ev)
    bus.close()

    def comparable(path: Path) -> dict:
        doc = json.loads((path / "training_metrics.json").read_text())
        for key in ("start_time", "end_time", "duration_seconds", "resumed_at", "log_dir"):
            doc.pop(key, None)
        return doc

    resumed = json.loads((killed_dir / "training_metrics.json").read_text())
    assert resumed["resumed_at"][0]["step"] == 6
    assert comparable(killed_dir) == comparable(straight_dir)


# ------------------------------------------------------------------------------------------ errors file
def test_errors_file(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    bus = EventBus([ErrorsFileSink(clean)])
    for ev in [run_started(clean, 3, 1), *epoch_events(1, 1, 3)]:
        bus.emit(ev)
    bus.close()
    assert not (clean / "errors.jsonl").exists()          # created only when there is an error

    bus = EventBus([ErrorsFileSink(tmp_path)])
    for ev in full_run(tmp_path):
        bus.emit(ev)
    bus.close()
    (rec,) = read_json_lines(tmp_path / "errors.jsonl")
    assert set(rec) >= {"timestamp", "category", "message", "error_type", "exception_type", "exception_message",
                        "context", "step", "epoch", "batch_index", "skipped_batch", "fatal", "rank"}
    assert rec["category"] == "DATA_ERROR" and rec["error_type"] == "DataError"
    assert rec["context"] == {"file_path": "train.jsonl", "line_number": 17, "field": "query"}
    assert (rec["step"], rec["epoch"], rec["batch_index"], rec["skipped_batch"], rec["fatal"], rec["rank"]) == \
           (1, 1, 0, True, False, 0)


# ------------------------------------------------------------------------------------------ progress
def _progress_output(monkeypatch, stream: io.StringIO, status: str, mode: str = "auto") -> list[str]:
    monkeypatch.setattr("sys.stderr", stream)
    bus = EventBus([ProgressSink(mode, interval=0.0)])
    for ev in [run_started(Path("unused"), 5, 1), *epoch_events(1, 1, 5, finish=False)]:
        bus.emit(ev)
    bus.emit(RunFinished(status=status, step=5, duration_seconds=1.0))
    bus.close()
    return stream.getvalue().splitlines()


def test_progress_lines_when_not_a_tty(monkeypatch) -> None:
    lines = _progress_output(monkeypatch, io.StringIO(), "FINISHED")
    assert len(lines) == 6
    for i, line in enumerate(lines[:-1], start=1):
        assert PROGRESS_RE.match(line), line
        assert line.startswith(f"Training: {i}/5 ({i * 20:.1f}%)")
    assert COMPLETED_RE.match(lines[-1]), lines[-1]
    assert lines[-1].startswith("Completed training: 5/5 (100.0%)")


def test_progress_no_completed_line_when_killed_and_bar_on_tty(monkeypatch) -> None:
    killed = _progress_output(monkeypatch, io.StringIO(), "KILLED")
    assert not any(COMPLETED_RE.match(line) for line in killed) and killed[-1].startswith("Stopped training (KILLED)")
    bar = _progress_output(monkeypatch, TtyStringIO(), "FINISHED")
    text = "\n".join(bar)
    assert "5/5" in text and "Training" in text and not any(PROGRESS_RE.match(line) for line in bar)
    assert _progress_output(monkeypatch, io.StringIO(), "FINISHED", mode="none") == []


# ------------------------------------------------------------------------------------------ secrets
def test_planted_secrets_never_reach_log_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MY_SERVICE_API_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer otlp-bearer-xyz")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")    # short flag values are not secrets
    log_dir = tmp_path / "logs"
    setup_logging("INFO", log_dir, json_logs=True, color=False)
    bus = EventBus([LogSink(every_n_steps=1), MetricsFileSink(log_dir), ErrorsFileSink(log_dir)])
    for ev in full_run(log_dir):
        bus.emit(ev)
    from splade_obs.errors import DataError
    from splade_obs.events import ErrorCaught
    bus.emit(ErrorCaught.from_error(DataError(f"token {SECRET} rejected", file_path="x", header=PASSWORD),
                                    step=1, epoch=1, skipped_batch=True))
    bus.close()
    log = logging.getLogger("some.library")
    log.warning("connecting with key %s and password %s", SECRET, PASSWORD, extra={"context": {"k": SECRET}})
    log.warning("otlp header otlp-bearer-xyz, parallelism=false")
    try:
        raise RuntimeError(f"auth failed for {SECRET}")
    except RuntimeError:
        log.exception("request failed")
    teardown_logging()

    files = all_file_text(log_dir)
    assert {Path(p).name for p in files} >= {"train_splade.jsonl", "train_splade.log", "training_metrics.json",
                                             "errors.jsonl"}
    for path, data in files.items():
        for secret in (SECRET, PASSWORD, "otlp-bearer-xyz"):
            assert secret.encode() not in data, f"{secret} leaked into {path}"
    plain = (log_dir / "train_splade.log").read_text()
    assert "connecting with key *** and password ***" in plain and "parallelism=false" in plain
    assert "auth failed for ***" in plain
    assert "token *** rejected" in (log_dir / "errors.jsonl").read_text()


# ------------------------------------------------------------------------------------------ end to end
E2E_ARGS = ["--max-steps", "3", "--batch-size", "4", "--max-query-length", "16", "--max-doc-length", "32",
            "--json-logs", "--no-mlflow", "--otel-exporter", "none"]


def _have_trainer() -> bool:
    root = Path(__file__).resolve().parents[1]
    return (root / "splade_obs" / "run.py").exists() and (root / "cli" / "train_cmd.py").exists()


needs_trainer = pytest.mark.skipif(not _have_trainer(), reason="splade_obs/run.py and cli/train_cmd.py not landed")


@pytest.fixture
def e2e_env(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


@needs_trainer
def test_e2e_train_logs_and_metrics_schema(e2e_env: Path) -> None:
    from click.testing import CliRunner

    from splade_obs_cli.main import cli

    out = e2e_env / "out"
    res = CliRunner().invoke(cli, ["train", "--output-dir", str(out), *E2E_ARGS, "--inject-fault", "batch:2:nan",
                                   "--progress", "lines"])
    assert res.exit_code == 0, res.output
    log_dir = out / "logs"
    docs = read_json_lines(log_dir / "train_splade.jsonl")
    for d in docs:
        check_json_log_line(d)
    steps = [d for d in docs if d.get("event") == "step_done"]
    assert steps and all(isinstance(d["step"], int) and isinstance(d["epoch"], int) for d in steps)
    errs = [d for d in docs if d.get("event") == "error_caught"]
    assert errs and errs[0]["level"] == "WARNING" and isinstance(errs[0]["context"], dict)
    assert (log_dir / "train_splade.log").stat().st_size > 0
    metrics = json.loads((log_dir / "training_metrics.json").read_text())
    check_metrics_file(metrics, finished=True)
    assert metrics["status"] == "FINISHED" and metrics["last_step"] == 3
    assert metrics["metrics_by_epoch"]["1"]["skipped_batches"] >= 1
    (err_rec, *_) = read_json_lines(log_dir / "errors.jsonl")
    assert err_rec["skipped_batch"] is True and err_rec["category"]
    info = json.loads((log_dir / "system_info.json").read_text())
    assert info["torch_version"] and "mixed_precision" in info
    console = res.stderr if hasattr(res, "stderr") else res.output
    assert any(CONSOLE_RE.match(line) for line in console.splitlines())
    assert any(COMPLETED_RE.match(line) for line in console.splitlines())


class LeakyRaisingSink(Sink):
    """Logs the planted secrets like a careless library would, then fails: on every call."""

    name = "leaky-raiser"
    scope = "rank"

    def __init__(self) -> None:
        self.calls = 0

    def handle(self, event):  # noqa: ANN001
        self.calls += 1
        logging.getLogger("careless.lib").warning("using key %s pw %s", os.environ["MY_SERVICE_API_KEY"],
                                                  os.environ["MLFLOW_TRACKING_PASSWORD"])
        raise RuntimeError(f"cannot reach server with {os.environ['MY_SERVICE_API_KEY']}")


@needs_trainer
def test_e2e_failing_sink_does_not_stop_run_and_secrets_stay_out(e2e_env: Path, monkeypatch) -> None:
    from splade_obs.config import TrainConfig
    from splade_obs.run import run_training

    monkeypatch.setenv("MY_SERVICE_API_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    out = e2e_env / "out"
    cfg = TrainConfig.from_mapping({
        "checkpoint.output_dir": str(out), "optim.max_steps": 3, "optim.batch_size": 4,
        "model.max_query_length": 16, "model.max_doc_length": 32, "logging.json_logs": True,
        "tracking.enabled": False, "tracing.exporter": "none", "logging.progress": "lines"})
    leaky, rec = LeakyRaisingSink(), RecordingSink()
    result = run_training(cfg, extra_sinks=[leaky, rec])

    assert result.status == "FINISHED"
    assert result.bus_stats["leaky-raiser"]["degraded"] is True and leaky.calls == result.bus_stats[
        "leaky-raiser"]["failures"]
    kinds = [e.kind for e in rec.events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert [e.step for e in rec.of(StepDone)] == [1, 2, 3]
    assert {"epoch_started", "epoch_done", "checkpoint_saved", "model_loaded", "data_loaded"} <= set(kinds)
    assert rec.of(SinkDegraded)[0].sink == "leaky-raiser"
    metrics = json.loads((out / "logs" / "training_metrics.json").read_text())
    assert metrics["status"] == "FINISHED" and "1" in metrics["metrics_by_epoch"]

    files = all_file_text(out / "logs")
    assert any(b"using key *** pw ***" in data for data in files.values())   # the leak was logged, masked
    for path, data in files.items():
        assert SECRET.encode() not in data and PASSWORD.encode() not in data, path


@needs_trainer
def test_e2e_metrics_valid_after_run_killed_mid_epoch(e2e_env: Path) -> None:
    from click.testing import CliRunner

    from splade_obs_cli.main import cli

    out = e2e_env / "out"
    res = CliRunner().invoke(cli, ["train", "--output-dir", str(out), *E2E_ARGS,
                                   "--inject-fault", "step:2:interrupt"])
    assert res.exit_code == 130, res.output
    metrics = json.loads((out / "logs" / "training_metrics.json").read_text())
    check_metrics_file(metrics, finished=True)
    assert metrics["status"] == "KILLED" and metrics["last_step"] == 2
    assert metrics["metrics_by_epoch"]["1"]["complete"] is False
    docs = read_json_lines(out / "logs" / "train_splade.jsonl")
    finished = [d for d in docs if d.get("event") == "run_finished"]
    assert finished and finished[0]["status"] == "KILLED" and finished[0]["level"] == "WARNING"
