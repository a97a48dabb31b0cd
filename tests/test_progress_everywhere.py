"""Progress of evaluate, encode, mine-negatives and in-training evaluation (issue 32, point 5).

Real splade-tiny, real click CliRunner runs on a small BEIR folder, a real short training: progress lines on
stderr (rate, ETA, a closing line with the time taken), stdout left to the JSON results, nothing with
``--progress none``, and the evaluation's phase timings on the ``EvaluationDone`` event.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from splade_obs.progress_util import CHUNK_BATCHES, Progress, ProgressSpec, encode_with_progress
from tests._eval_utils import DOCS, QRELS, QUERIES, write_beir

LINE = re.compile(r"^(?P<desc>[A-Z][\w ()]*): (?P<n>\d+)/(?P<total>\d+) \(\d+\.\d%\) "
                  r"\[(?P<rate>\d+\.\d) (?P<unit>\w+)/s, ETA: (?P<eta>\d+\.\d)s\]$")
DONE = re.compile(r"^Completed (?P<desc>[a-z][\w ()]*): (?P<n>\d+)/(?P<total>\d+) \(100\.0%\) in (?P<secs>\d+\.\d)s "
                  r"\[(?P<rate>\d+\.\d) (?P<unit>\w+)/s\]$")
BATCH = 1  # one text per batch: several progress updates even on a 10-document corpus


def progress_lines(stderr: str, desc: str) -> list[re.Match[str]]:
    return [m for m in map(LINE.match, stderr.splitlines()) if m and m["desc"] == desc]


def done_lines(stderr: str, desc: str) -> list[re.Match[str]]:
    return [m for m in map(DONE.match, stderr.splitlines()) if m and m["desc"] == desc]


def assert_counts_up_to(lines: list[re.Match[str]], total: int, unit: str) -> None:
    """The lines of one task: ``n`` rising to ``total`` in steps of one encoding chunk (or one query)."""
    assert lines, "no progress line"
    ns = [int(m["n"]) for m in lines]
    assert ns == sorted(set(ns)) and ns[-1] == total and all(int(m["total"]) == total for m in lines)
    assert all(m["unit"] == unit and float(m["rate"]) > 0 for m in lines)
    assert float(lines[-1]["eta"]) == 0.0


def expected_chunks(n: int) -> int:
    return math.ceil(n / (BATCH * CHUNK_BATCHES))


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    root = write_beir(tmp_path_factory.mktemp("progress") / "beir", split="test")
    return write_beir(root, split="train")


def invoke(args: list[str]):
    from splade_obs_cli.main import cli

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def evaluated(beir):
    """One evaluate run with progress lines at every update, one with progress off."""
    common = ["evaluate", "--model", "splade-tiny", "--data", str(beir), "--split", "test", "--max-query-length",
              "16", "--max-doc-length", "32", "--batch-size", str(BATCH)]
    return (invoke(common + ["--progress", "lines", "--progress-interval", "0"]),
            invoke(common + ["--progress", "none"]))


# ------------------------------------------------------------------------------------------------ evaluate
def test_evaluate_prints_progress_lines_on_stderr_and_keeps_stdout_json(evaluated) -> None:
    lines_run, _ = evaluated
    payload = json.loads(lines_run.stdout)  # the whole of stdout is the JSON result: no progress there
    assert "Encoding" not in lines_run.stdout
    docs = progress_lines(lines_run.stderr, "Encoding documents")
    assert len(docs) == expected_chunks(len(DOCS))
    assert_counts_up_to(docs, len(DOCS), "texts")
    assert_counts_up_to(progress_lines(lines_run.stderr, "Encoding queries"), len(QUERIES), "texts")
    for desc, total in (("encoding documents", len(DOCS)), ("encoding queries", len(QUERIES))):
        (done,) = done_lines(lines_run.stderr, desc)
        assert int(done["n"]) == total and float(done["rate"]) > 0
    # the time taken: per phase in the metrics, the whole command in duration_seconds and on stderr
    metrics = payload["metrics"]
    phases = metrics["encode_docs_s"] + metrics["encode_queries_s"] + metrics["search_s"]
    assert 0 < phases < payload["duration_seconds"]
    assert re.search(r"evaluated 4 queries against 10 documents in \d+\.\ds \(encoding \d+\.\ds, retrieval "
                     r"\d+\.\ds\)", lines_run.stderr)


def test_evaluate_with_progress_none_prints_no_progress(evaluated) -> None:
    lines_run, none_run = evaluated
    assert "Encoding" not in none_run.stderr and "Completed" not in none_run.stderr
    assert "ndcg@10" in none_run.stderr, "the table still comes"
    quiet, loud = json.loads(none_run.stdout), json.loads(lines_run.stdout)
    assert quiet["metrics"]["ndcg@10"] == loud["metrics"]["ndcg@10"], "progress does not change the results"
    assert quiet["metrics"]["doc_nnz"] == loud["metrics"]["doc_nnz"]


# ------------------------------------------------------------------------------------------------ encode
def test_encode_progress_lines_and_the_interval(beir, tmp_path) -> None:
    common = ["encode", "--model", "splade-tiny", "--input", str(beir), "--kind", "corpus", "--max-length", "32",
              "--batch-size", str(BATCH)]
    every = invoke(common + ["--output", str(tmp_path / "a.jsonl"), "--progress", "lines", "--progress-interval", "0"])
    docs = progress_lines(every.stderr, "Encoding documents")
    assert len(docs) == expected_chunks(len(DOCS))
    assert_counts_up_to(docs, len(DOCS), "texts")
    assert len(done_lines(every.stderr, "encoding documents")) == 1
    assert re.search(r"encoded 10 corpus records in \d+\.\ds .*; \d+\.\ds in all", every.stderr)
    assert every.stdout == ""

    # the default interval (10 s) is longer than this run: only the closing line
    spaced = invoke(common + ["--output", str(tmp_path / "b.jsonl"), "--progress", "lines"])
    assert not progress_lines(spaced.stderr, "Encoding documents")
    assert len(done_lines(spaced.stderr, "encoding documents")) == 1

    quiet = invoke(common + ["--output", str(tmp_path / "c.jsonl"), "--progress", "none"])
    assert "Encoding" not in quiet.stderr and "Completed" not in quiet.stderr
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "c.jsonl").read_text(), "same vectors either way"


# ------------------------------------------------------------------------------------------------ mine-negatives
def test_mine_negatives_progress_lines(beir, tmp_path) -> None:
    run = invoke(["mine-negatives", "--data", str(beir), "--split", "train", "--output", str(tmp_path / "m.jsonl"),
                  "--max-query-length", "16", "--max-doc-length", "32", "--batch-size", str(BATCH),
                  "--progress", "lines", "--progress-interval", "0"])
    queries = len({q for q, _, _ in QRELS})
    assert_counts_up_to(progress_lines(run.stderr, "Encoding documents"), len(DOCS), "texts")
    assert_counts_up_to(progress_lines(run.stderr, "Encoding queries"), queries, "texts")
    mined = progress_lines(run.stderr, "Mining queries")
    assert [int(m["n"]) for m in mined] == list(range(1, queries + 1)), "one line per query at interval 0"
    assert_counts_up_to(mined, queries, "queries")
    assert len(done_lines(run.stderr, "mining queries")) == 1
    assert re.search(r"mined \d+ records .* in \d+\.\ds; .*; \d+\.\ds in all", run.stderr)
    assert run.stdout == ""


# ------------------------------------------------------------------------------------------------ library parts
def test_chunked_encoding_gives_exactly_the_vectors_of_one_call() -> None:
    from splade_obs.model import SpladeEncoder

    encoder = SpladeEncoder.from_pretrained("splade-tiny")
    texts = [f"{t} {x}" for t, x in DOCS.values()] + list(QUERIES.values())
    plain = encoder.encode(texts, max_length=32, batch_size=3, top_k=20)
    seen: list[int] = []
    bar = Progress("Encoding", len(texts), mode="none")
    bar.update = seen.append  # type: ignore[method-assign]  # record the updates
    chunked = encode_with_progress(encoder, texts, max_length=32, batch_size=3, top_k=20, progress=bar)
    assert chunked.shape == plain.shape and (chunked != plain).nnz == 0, "bit-identical vectors, input order"
    assert sum(seen) == len(texts) and len(seen) == math.ceil(len(texts) / (3 * CHUNK_BATCHES))


def test_bar_mode_draws_a_tqdm_bar_and_a_nested_bar_does_not_stay(capsys) -> None:
    from tqdm import tqdm

    with Progress("Encoding documents", 5, unit="texts", mode="bar") as bar:
        bar.update(5)
    err = capsys.readouterr().err
    assert "Encoding documents" in err and "5/5" in err and "texts/s" in err and "Completed" not in err

    training = tqdm(total=10, desc="Training", file=io.StringIO())  # a training bar is on screen
    try:
        inner = Progress("Encoding queries", 3, mode="bar")
        assert inner._bar is not None and inner._bar.leave is False, "cleared when done, the training bar stays"
        inner.close()
    finally:
        training.close()
    with pytest.raises(ValueError, match="progress mode"):
        ProgressSpec("sometimes")


# ------------------------------------------------------------------------------------------------ in training
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two real short trainings with in-training evaluation: progress as lines, and progress off."""
    from splade_obs.bus import RecordingSink
    from splade_obs.config import TrainConfig
    from splade_obs.run import run_training

    root = tmp_path_factory.mktemp("intrain")
    data = write_beir(root / "beir", split="dev")
    out = {}
    for mode in ("lines", "none"):
        cfg = TrainConfig.from_mapping({
            "checkpoint": {"output_dir": str(root / mode)},
            "optim": {"batch_size": 4, "max_steps": 2, "seed": 7, "mixed_precision": "no"},
            "model": {"max_query_length": 16, "max_doc_length": 32},
            "tracking": {"enabled": False}, "tracing": {"exporter": "file" if mode == "lines" else "none"},
            "logging": {"progress": mode, "progress_interval": 0.001},
            "eval": {"eval_data": str(data), "eval_split": "dev", "eval_steps": 1},
        })
        rec, err = RecordingSink(), io.StringIO()
        with contextlib.redirect_stderr(err):
            res = run_training(cfg, extra_sinks=[rec])
        assert res.status == "FINISHED", err.getvalue()[-2000:]
        out[mode] = (rec, err.getvalue())
    return out


def test_in_training_evaluation_done_carries_the_phase_timings(trained) -> None:
    from splade_obs.events import EvaluationDone

    evals = trained["lines"][0].of(EvaluationDone)
    assert [e.step for e in evals] == [1, 2]
    for e in evals:
        assert list(e.phases) == ["encode_docs", "encode_queries", "retrieve"]
        end_ns = e.start_ns + int(e.duration_seconds * 1e9)
        previous_end = e.start_ns
        for start, end in e.phases.values():  # in order, not overlapping, inside the evaluation
            assert previous_end <= start <= end
            previous_end = end
        assert previous_end <= end_ns + 5_000_000  # two clocks (wall for start_ns, monotonic for the duration)
        seconds = e.phase_seconds()
        assert all(s > 0 for s in seconds.values()) and sum(seconds.values()) <= e.duration_seconds
        assert seconds["encode_docs"] == pytest.approx(e.scores["encode_docs_s"], abs=0.01)
        assert json.loads(json.dumps(e.to_dict()))["phases"]["retrieve"] == list(e.phases["retrieve"])


def test_the_evaluation_span_has_encode_and_retrieve_children(trained) -> None:
    from splade_obs.events import RunStarted

    log_dir = Path(trained["lines"][0].of(RunStarted)[0].log_dir)
    spans = [json.loads(line) for line in (log_dir / "traces.jsonl").read_text().splitlines()]
    evals = [s for s in spans if s["name"] == "evaluation"]
    assert len(evals) == 2
    for ev in evals:
        sid = ev["context"]["span_id"]
        children = [(s["name"], s["attributes"].get("splade.eval.input")) for s in spans if s.get("parent_id") == sid]
        assert children == [("encode", "documents"), ("encode", "queries"), ("retrieve", None)], children


def test_in_training_evaluation_progress_lines_and_none(trained) -> None:
    _, err = trained["lines"]
    assert len(done_lines(err, "encoding documents")) == 2, "one closing line per evaluation"
    assert len(done_lines(err, "encoding queries")) == 2
    assert_counts_up_to(progress_lines(err, "Encoding documents")[-1:], len(DOCS), "texts")
    assert progress_lines(err, "Training"), "the training lines are still there"
    _, quiet = trained["none"]
    assert "Encoding" not in quiet and "Completed" not in quiet and "Training:" not in quiet
