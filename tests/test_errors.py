"""Typed errors, classify() on real foreign exceptions, and the recovery helpers with an injected clock."""

from __future__ import annotations

import json
import logging
import random
import socket
import urllib.error

import pytest
import torch

from splade_obs import errors as E
from splade_obs.errors import EXIT_CODES, ApplicationError, ErrorCategory, classify
from splade_obs.recovery import ErrorBudget, catch_and_log_exceptions, retry, retry_listener, validate_file_exists

CLASSES = {
    ErrorCategory.DATA_ERROR: E.DataError, ErrorCategory.MODEL_ERROR: E.ModelError,
    ErrorCategory.TRAINING_ERROR: E.TrainingError, ErrorCategory.EVALUATION_ERROR: E.EvaluationError,
    ErrorCategory.INFERENCE_ERROR: E.InferenceError, ErrorCategory.DEVICE_ERROR: E.DeviceError,
    ErrorCategory.FILE_SYSTEM_ERROR: E.FileSystemError, ErrorCategory.DEPENDENCY_ERROR: E.DependencyError,
    ErrorCategory.CONFIG_ERROR: E.ConfigError,
}


def test_categories_are_exactly_the_ten():
    assert [c.name for c in ErrorCategory] == [
        "DATA_ERROR", "MODEL_ERROR", "TRAINING_ERROR", "EVALUATION_ERROR", "INFERENCE_ERROR", "DEVICE_ERROR",
        "FILE_SYSTEM_ERROR", "DEPENDENCY_ERROR", "CONFIG_ERROR", "UNKNOWN_ERROR"]


@pytest.mark.parametrize("category,cls", list(CLASSES.items()))
def test_each_class_knows_category_exit_code_and_renders(category, cls):
    orig = ValueError("bad value")
    err = cls("something broke", original_exception=orig, file_path="train.jsonl", line_number=1024)
    assert isinstance(err, ApplicationError)
    assert err.category is category
    assert err.exit_code == EXIT_CODES[category]
    assert err.retryable is False
    assert err.one_line() == f"error[{category.value}]: train.jsonl:1024: something broke (ValueError: bad value)"
    d = err.to_dict()
    assert d["category"] == category.value and d["message"] == "something broke"
    assert d["context"] == {"file_path": "train.jsonl", "line_number": 1024}
    assert d["original_exception"] == {"type": "ValueError", "message": "bad value"}
    json.dumps(d)  # serialisable as is


def test_exit_codes_are_distinct_and_not_click_usage():
    codes = list(EXIT_CODES.values())
    assert len(set(codes)) == len(codes) == 10
    assert 0 not in codes and 2 not in codes and 130 not in codes


def test_json_array_index_location():
    err = E.DataError('field "query" is missing', file_path="t.json", index=3)
    assert err.one_line() == 'error[DATA_ERROR]: t.json[3]: field "query" is missing'


def test_classify_real_foreign_exceptions(tmp_path):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert classify(oom).category is ErrorCategory.DEVICE_ERROR
    assert classify(RuntimeError("CUDA error: device-side assert triggered")).category is ErrorCategory.DEVICE_ERROR
    try:
        json.loads('{"query": ')
    except json.JSONDecodeError as exc:
        assert classify(exc).category is ErrorCategory.DATA_ERROR
    try:
        b"\xff\xfe\xfa".decode("utf-8")
    except UnicodeDecodeError as exc:
        assert classify(exc).category is ErrorCategory.DATA_ERROR
    try:
        open(tmp_path / "missing.txt")
    except FileNotFoundError as exc:
        err = classify(exc)
        assert err.category is ErrorCategory.FILE_SYSTEM_ERROR
        assert err.context["file_path"].endswith("missing.txt")
    try:
        open(tmp_path)
    except IsADirectoryError as exc:
        assert classify(exc).category is ErrorCategory.FILE_SYSTEM_ERROR
    try:
        import splade_obs_no_such_module  # noqa: F401
    except ImportError as exc:
        assert classify(exc).category is ErrorCategory.DEPENDENCY_ERROR
    # transformers' own OSError for a model folder without a checkpoint
    import shutil
    from transformers import AutoModelForMaskedLM
    from splade_obs.hub import resolve_model
    (tmp_path / "no_weights").mkdir()
    shutil.copy(f"{resolve_model('splade-tiny')}/config.json", tmp_path / "no_weights")
    try:
        AutoModelForMaskedLM.from_pretrained(str(tmp_path / "no_weights"))
    except OSError as exc:
        assert classify(exc).category is ErrorCategory.MODEL_ERROR
    else:  # pragma: no cover
        pytest.fail("transformers accepted an empty folder")
    # connection errors are retryable
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1)
    except OSError as exc:
        assert classify(exc).retryable
    assert classify(urllib.error.URLError("refused")).retryable
    assert classify(TimeoutError()).retryable
    assert not classify(ValueError("x")).retryable
    assert classify(ValueError("x")).category is ErrorCategory.UNKNOWN_ERROR
    assert classify(ValueError("x"), ErrorCategory.EVALUATION_ERROR).category is ErrorCategory.EVALUATION_ERROR


def test_classify_keeps_application_errors():
    err = E.ConfigError("bad")
    assert classify(err, step=3) is err and err.context["step"] == 3


class FakeClock:
    def __init__(self):
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)


def test_retry_backoff_with_full_jitter_bounds():
    clock = FakeClock()
    calls = []

    @retry(max_attempts=5, delay=1.0, backoff_factor=2.0, max_delay=5.0, jitter=True,
           retry_on=(ConnectionError,), sleep=clock.sleep, rng=random.Random(1))
    def flaky():
        calls.append(1)
        raise ConnectionError("down")

    seen = []
    with retry_listener(seen.append):
        with pytest.raises(ApplicationError) as info:
            flaky()
    assert len(calls) == 5 and len(clock.sleeps) == 4
    caps = [1.0, 2.0, 4.0, 5.0]
    assert all(0.0 <= s <= c for s, c in zip(clock.sleeps, caps))
    assert info.value.retryable and isinstance(info.value.original_exception, ConnectionError)
    assert info.value.context["attempts"] == 5
    assert [s["attempt"] for s in seen] == [1, 2, 3, 4]


def test_retry_without_jitter_grows_exactly_and_succeeds():
    clock = FakeClock()
    state = {"n": 0}

    @retry(max_attempts=4, delay=0.5, backoff_factor=3.0, max_delay=100, jitter=False, sleep=clock.sleep)
    def works_third_time():
        state["n"] += 1
        if state["n"] < 3:
            raise TimeoutError("slow")
        return "ok"

    assert works_third_time() == "ok"
    assert clock.sleeps == [0.5, 1.5]


def test_retry_does_not_retry_non_retryable():
    clock = FakeClock()
    calls = []

    @retry(max_attempts=5, sleep=clock.sleep)
    def broken():
        calls.append(1)
        raise ValueError("a bug, not a fault")

    with pytest.raises(ApplicationError) as info:
        broken()
    assert len(calls) == 1 and clock.sleeps == []
    assert info.value.category is ErrorCategory.UNKNOWN_ERROR


def test_retry_waits_are_capped_by_max_delay_and_jitter_draws_below_the_cap():
    def waits(jitter: bool) -> list[float]:
        clock = FakeClock()

        @retry(max_attempts=6, delay=1.0, backoff_factor=2.0, max_delay=8.0, jitter=jitter, sleep=clock.sleep,
               rng=random.Random(0))
        def down():
            raise ConnectionError("down")

        with pytest.raises(ApplicationError):
            down()
        return clock.sleeps

    caps = waits(jitter=False)
    assert caps == [1.0, 2.0, 4.0, 8.0, 8.0]
    jittered = waits(jitter=True)
    assert all(0 <= a <= b for a, b in zip(jittered, caps)) and len(set(jittered)) == 5


def test_catch_and_log_exceptions_logs_category_and_reraises_typed(caplog):
    @catch_and_log_exceptions(ErrorCategory.INFERENCE_ERROR, batch=7)
    def encode():
        raise RuntimeError("shape mismatch")

    with caplog.at_level(logging.ERROR):
        with pytest.raises(E.InferenceError) as info:
            encode()
    assert info.value.context["batch"] == 7
    rec = caplog.records[-1]
    assert rec.category == "INFERENCE_ERROR" and "shape mismatch" in rec.getMessage()


def test_validate_file_exists(tmp_path):
    with pytest.raises(E.FileSystemError) as info:
        validate_file_exists(tmp_path / "nope.jsonl")
    assert info.value.exit_code == EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR]
    with pytest.raises(E.FileSystemError):
        validate_file_exists(tmp_path)  # a directory where a file is expected
    f = tmp_path / "ok.jsonl"
    f.write_text("{}")
    assert validate_file_exists(f) == f


def test_error_budget_rules():
    b = ErrorBudget(max_skipped=3, max_fraction=0.5, max_consecutive=2, min_batches_for_fraction=4)
    b.record_failure(ErrorCategory.DEVICE_ERROR)
    assert b.exceeded() is None
    b.record_failure(ErrorCategory.DATA_ERROR)
    assert "consecutive" in b.exceeded()
    b = ErrorBudget(max_skipped=1, max_fraction=1.0, max_consecutive=10)
    b.record_failure("DEVICE_ERROR"); b.record_ok(); b.record_failure("DEVICE_ERROR")
    assert "max-skipped-batches" in b.exceeded()
    err = b.to_error(b.exceeded())
    assert err.category is ErrorCategory.TRAINING_ERROR and err.context["dominant_category"] == "DEVICE_ERROR"
    b = ErrorBudget(max_skipped=100, max_fraction=0.25, max_consecutive=10, min_batches_for_fraction=4)
    for _ in range(3):
        b.record_ok()
    b.record_failure("DATA_ERROR"); b.record_ok(); b.record_failure("DATA_ERROR")
    assert "max-skipped-fraction" in b.exceeded()
    restored = ErrorBudget()
    restored.load_state_dict(b.state_dict())
    assert restored.state_dict() == b.state_dict()
