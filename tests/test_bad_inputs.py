"""The bad-input suite: each malformed input gives the right category, place and field, through the
library (load_training_data) and through the real CLI (`splade-obs train`), with the exit code of its
category and no traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from splade_obs import data as data_mod
from splade_obs.data import load_training_data
from splade_obs.errors import EXIT_CODES, ApplicationError, ErrorCategory

DATA, FS = ErrorCategory.DATA_ERROR, ErrorCategory.FILE_SYSTEM_ERROR
GOOD = {"query": "what river flows through Velmora", "positive": "The Tasko flows through Velmora."}
TRAIN_CMD = Path(__file__).resolve().parents[1] / "cli" / "train_cmd.py"


@dataclass
class Case:
    """A malformed input: ``build(tmp)`` writes it and returns (path passed to the loader, expected location)."""

    build: Callable[[Path], tuple[Path, str]]
    category: ErrorCategory
    field: str | None = None  # the field the error names, when one applies
    says: str = ""  # a fragment the message must contain


def _jsonl(tmp: Path, lines: list[str], name: str = "train.jsonl") -> Path:
    p = tmp / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def _good() -> str:
    return json.dumps(GOOD)


def _record_case(record: object, line: int = 2) -> Callable[[Path], tuple[Path, str]]:
    """A JSONL file whose line ``line`` holds ``record`` and all other lines are good."""

    def build(tmp: Path) -> tuple[Path, str]:
        lines = [_good()] * 3
        lines[line - 1] = json.dumps(record)
        p = _jsonl(tmp, lines)
        return p, f"{p}:{line}"

    return build


def _invalid_json_line(tmp: Path) -> tuple[Path, str]:
    p = _jsonl(tmp, [_good(), _good(), '{"query": "q", "positive": }'])
    return p, f"{p}:3"


def _invalid_json_array(tmp: Path) -> tuple[Path, str]:
    p = tmp / "train.json"
    p.write_text('[\n  {"query": "q", "positive": "p"},\n  {"query": "q2" "positive": "p"}\n]\n', encoding="utf-8")
    return p, f"{p}:3"


def _top_level_object(tmp: Path) -> tuple[Path, str]:
    p = tmp / "train.json"
    p.write_text(json.dumps({"records": [GOOD, GOOD]}, indent=2), encoding="utf-8")
    return p, f"{p}:1"


def _array_bad_element(tmp: Path) -> tuple[Path, str]:
    p = tmp / "train.json"
    p.write_text(json.dumps([GOOD, {"query": "q", "positive": ["not", "a", "string"]}, GOOD]), encoding="utf-8")
    return p, f"{p}[1]"


def _non_utf8_line(tmp: Path) -> tuple[Path, str]:
    p = tmp / "train.jsonl"
    p.write_bytes(_good().encode() + b'\n{"query": "caf\xe9", "positive": "p"}\n' + _good().encode() + b"\n")
    return p, f"{p}:2"


def _non_utf8_array(tmp: Path) -> tuple[Path, str]:
    p = tmp / "train.json"
    p.write_bytes(b'[\n {"query": "q", "positive": "p"},\n {"query": "\xff\xfe", "positive": "p"}\n]')
    return p, f"{p}:3"


def _empty_file(tmp: Path) -> tuple[Path, str]:
    p = tmp / "train.jsonl"
    p.write_bytes(b"")
    return p, str(p)


def _blank_file(tmp: Path) -> tuple[Path, str]:
    p = tmp / "train.jsonl"
    p.write_text("\n   \n\t\n", encoding="utf-8")
    return p, str(p)


def _plain_directory(tmp: Path) -> tuple[Path, str]:
    d = tmp / "not_beir"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    return d, str(d)


def _missing_file(tmp: Path) -> tuple[Path, str]:
    p = tmp / "no_such_file.jsonl"
    return p, str(p)


def _huge_line(tmp: Path) -> tuple[Path, str]:
    p = tmp / "train.jsonl"
    with open(p, "wb") as f:
        f.write(_good().encode() + b"\n")
        f.write(b'{"query": "q", "positive": "' + b"x" * (data_mod.MAX_LINE_BYTES + 1024) + b'"}\n')
        f.write(_good().encode() + b"\n")
    return p, f"{p}:2"


def _beir(tmp: Path, qrels: str, corpus_line: str | None = None) -> Path:
    root = tmp / "beir"
    (root / "qrels").mkdir(parents=True)
    corpus = [json.dumps({"_id": "d1", "title": "T", "text": "doc one"}), json.dumps({"_id": "d2", "text": "two"})]
    if corpus_line is not None:
        corpus[1] = corpus_line
    (root / "corpus.jsonl").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "one"}) + "\n", encoding="utf-8")
    (root / "qrels" / "train.tsv").write_text(qrels, encoding="utf-8")
    return root


def _beir_broken_qrels_row(tmp: Path) -> tuple[Path, str]:
    root = _beir(tmp, "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1 d2\n")
    return root, f"{root / 'qrels' / 'train.tsv'}:3"


def _beir_bad_qrels_score(tmp: Path) -> tuple[Path, str]:
    root = _beir(tmp, "query-id\tcorpus-id\tscore\nq1\td1\thigh\n")
    return root, f"{root / 'qrels' / 'train.tsv'}:2"


def _beir_broken_corpus_line(tmp: Path) -> tuple[Path, str]:
    root = _beir(tmp, "query-id\tcorpus-id\tscore\nq1\td1\t1\n", corpus_line='{"_id": "d2", "text": ')
    return root, f"{root / 'corpus.jsonl'}:2"


CASES: dict[str, Case] = {
    "invalid_json_line": Case(_invalid_json_line, DATA, None, "invalid JSON"),
    "invalid_json_array": Case(_invalid_json_array, DATA, None, "invalid JSON"),
    "top_level_object": Case(_top_level_object, DATA, None, "top-level JSON value is an object"),
    "record_is_a_list": Case(_record_case(["q", "p"]), DATA, None, "record is a list"),
    "missing_query": Case(_record_case({"positive": "p"}), DATA, "query", "is missing"),
    "empty_query": Case(_record_case({"query": "   ", "positive": "p"}), DATA, "query", "is empty"),
    "non_string_query": Case(_record_case({"query": 42, "positive": "p"}), DATA, "query", "is a number (42)"),
    "missing_positive": Case(_record_case({"query": "q"}, line=3), DATA, "positive", "is missing"),
    "both_positive_forms": Case(_record_case({"query": "q", "positive": "p", "positives": ["p"]}), DATA,
                                "positives", "both given"),
    "empty_positives_list": Case(_record_case({"query": "q", "positives": []}, line=1), DATA, "positives",
                                 "empty list"),
    "non_string_positive_item": Case(_record_case({"query": "q", "positives": ["p", None]}), DATA,
                                     "positives[1]", "is null"),
    "negatives_not_a_list": Case(_record_case({"query": "q", "positive": "p", "negatives": "n"}), DATA,
                                 "negatives", "is a string"),
    "scores_wrong_length": Case(_record_case({"query": "q", "positive": "p", "negatives": ["n"], "scores": [1.0]}),
                                DATA, "scores", "has 1 value"),
    "scores_not_numbers": Case(_record_case({"query": "q", "positive": "p", "negatives": ["n"],
                                             "scores": [1.0, "high"]}), DATA, "scores[1]", "is a string"),
    "array_bad_element": Case(_array_bad_element, DATA, "positive", "is a list"),
    "non_utf8_line": Case(_non_utf8_line, DATA, None, "not valid UTF-8"),
    "non_utf8_json_array": Case(_non_utf8_array, DATA, None, "not valid UTF-8"),
    "empty_file": Case(_empty_file, DATA, None, "no training examples"),
    "blank_file": Case(_blank_file, DATA, None, "no training examples"),
    "directory_not_beir": Case(_plain_directory, DATA, None, "missing corpus.jsonl"),
    "missing_file": Case(_missing_file, FS, None, "not found"),
    "huge_line": Case(_huge_line, DATA, None, "MB long"),
    "beir_broken_qrels_row": Case(_beir_broken_qrels_row, DATA, None, "expected three tab-separated columns"),
    "beir_qrels_score_not_int": Case(_beir_bad_qrels_score, DATA, "score", "not an integer"),
    "beir_broken_corpus_line": Case(_beir_broken_corpus_line, DATA, None, "invalid JSON"),
}


def test_suite_is_large_enough():
    assert len(CASES) >= 12


@pytest.mark.parametrize("name", sorted(CASES))
def test_library_reports_category_location_and_field(name, tmp_path):
    case = CASES[name]
    path, location = case.build(tmp_path)
    with pytest.raises(ApplicationError) as info:
        load_training_data(str(path))
    err = info.value
    assert err.category is case.category, err.one_line()
    assert err.location == location
    assert err.context.get("field") == case.field
    assert case.says in err.message
    assert err.one_line().startswith(f"error[{case.category.value}]: {location}: ")


def test_huge_line_limit_is_a_setting_and_the_line_is_not_parsed(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "MAX_LINE_BYTES", 200)
    p = _jsonl(tmp_path, [_good(), json.dumps({"query": "q", "positive": "y" * 300})])
    calls = []
    real_loads = json.loads
    monkeypatch.setattr(data_mod.json, "loads", lambda s, *a, **k: calls.append(len(s)) or real_loads(s, *a, **k))
    loaded = load_training_data(str(p), on_bad_record="skip", bad_records_path=tmp_path / "bad.jsonl")
    assert loaded.num_skipped == 1 and len(loaded.examples) == 1
    assert calls and max(calls) < 200  # the long line never reached the JSON parser
    row = json.loads((tmp_path / "bad.jsonl").read_text())
    assert row["location"] == f"{p}:2" and "at most 200 bytes" in row["message"] and "yyyy" not in row["record"]


def _cli():
    if not TRAIN_CMD.is_file() or "def train" not in TRAIN_CMD.read_text(encoding="utf-8"):
        pytest.skip("cli/train_cmd.py (the lead's train command) has not landed yet")
    from splade_obs_cli.main import cli

    return cli


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_reports_one_line_and_the_category_exit_code(name, tmp_path):
    from click.testing import CliRunner

    cli = _cli()
    case = CASES[name]
    path, location = case.build(tmp_path)
    result = CliRunner().invoke(cli, ["train", "--train-file", str(path), "--output-dir", str(tmp_path / "out"),
                                      "--no-mlflow", "--otel-exporter", "none"])
    assert result.exit_code == EXIT_CODES[case.category], (result.output, result.stderr)
    err_lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error[")]
    assert err_lines, result.stderr
    assert err_lines[0].startswith(f"error[{case.category.value}]: {location}: "), err_lines[0]
    assert case.says in result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    # It failed fast, before the model loaded: no final model (out/final/), no checkpoint (out/checkpoints/).
    assert not (tmp_path / "out" / "final").exists()
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert "Model splade-tiny loaded" not in result.output + result.stderr


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path):
    """``encode --output`` equal to ``--input``, ``mine-negatives --output`` onto the data folder's own
    queries: a config error naming the flag, before the input is touched (the output used to replace it)."""
    import shutil

    from click.testing import CliRunner

    from splade_obs.data import DEMO_RETRIEVAL_DIR

    data = tmp_path / "beir"
    shutil.copytree(DEMO_RETRIEVAL_DIR, data)
    before = {p: p.read_bytes() for p in (data / "corpus.jsonl", data / "queries.jsonl")}
    runs = [["encode", "--model", "splade-tiny", "--input", str(data / "corpus.jsonl"), "--kind", "corpus",
             "--output", str(data / "corpus.jsonl")],
            ["encode", "--model", "splade-tiny", "--input", str(data), "--kind", "corpus",  # a BEIR folder's
             "--output", str(data / "corpus.jsonl")],
            ["search", "--model", "splade-tiny", "--index-from", str(data), "--queries", str(data),
             "--output", str(data / "queries.jsonl")],
            ["mine-negatives", "--method", "bm25", "--data", str(data), "--split", "test",
             "--output", str(data / "queries.jsonl")]]
    for args in runs:
        result = CliRunner().invoke(_cli(), args)
        assert result.exit_code == EXIT_CODES[ErrorCategory.CONFIG_ERROR], (args[0], result.output, result.stderr)
        assert result.stderr.startswith("error[CONFIG_ERROR]: ") and "--output" in result.stderr, result.stderr
        assert "also an input" in result.stderr and "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in before} == before


def test_a_model_folder_without_its_tokenizer_is_a_model_error(tmp_path, tiny_model_path):
    """transformers builds a 5-token tokenizer for a folder without tokenizer files: every word became [UNK]
    and evaluation scored garbage with exit code 0. Now: one line naming the folder, the model error's code."""
    import shutil

    from click.testing import CliRunner

    from splade_obs.data import DEMO_RETRIEVAL_DIR

    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    for f in model.glob("tokenizer*"):
        f.unlink()
    result = CliRunner().invoke(_cli(), ["encode", "--model", str(model), "--input",
                                         str(DEMO_RETRIEVAL_DIR / "corpus.jsonl"), "--kind", "corpus",
                                         "--output", str(tmp_path / "out.jsonl")])
    assert result.exit_code == EXIT_CODES[ErrorCategory.MODEL_ERROR], (result.output, result.stderr)
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error[")]
    assert line.startswith(f"error[MODEL_ERROR]: {model}: its tokenizer has ") and "Traceback" not in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_an_output_path_blocked_by_a_file_or_folder_is_a_file_system_error(tmp_path, monkeypatch):
    """An output under a regular file or onto a folder: the file system error's code, naming the flag and the
    path in the way, before any work (evaluate used to encode everything, then fail with the command's own
    category and the parent's bare errno text; encode named its temp file)."""
    from click.testing import CliRunner

    from splade_obs.data import DEMO_RETRIEVAL_DIR

    monkeypatch.chdir(tmp_path)
    (tmp_path / "regfile").write_text("")
    (tmp_path / "adir").mkdir()
    cases = {("evaluate", "--model", "splade-tiny", "--data", str(DEMO_RETRIEVAL_DIR), "--output", "regfile/x.json"):
             "regfile: --output regfile/x.json needs a folder here, and this is a file",
             ("encode", "--model", "splade-tiny", "--input", str(DEMO_RETRIEVAL_DIR / "queries.jsonl"), "--kind",
              "queries", "--output", "adir"): "adir: --output needs a file, and this is a folder",
             ("mine-negatives", "--method", "bm25", "--data", str(DEMO_RETRIEVAL_DIR), "--split", "test", "--output",
              "regfile/m.jsonl"): "regfile: --output regfile/m.jsonl needs a folder here"}
    for args, says in cases.items():
        result = CliRunner().invoke(_cli(), list(args))
        assert result.exit_code == EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR], (args[0], result.stderr)
        assert result.stderr.startswith(f"error[FILE_SYSTEM_ERROR]: {says}"), result.stderr  # before the model
        assert "Traceback" not in result.stderr
    # where the command does not check first, the error still has the file system's code and the path in the way
    from splade_obs.errors import classify
    err = classify(FileExistsError(17, "File exists", str(tmp_path / "regfile")))
    assert err.category is ErrorCategory.FILE_SYSTEM_ERROR and "a file is in the way" in err.message
    moved = classify(IsADirectoryError(21, "Is a directory", str(tmp_path / ".adir.tmp"), None, str(tmp_path / "adir")))
    assert moved.context["file_path"] == str(tmp_path / "adir")


def test_nan_flags_and_an_unknown_stemmer_name_the_flag(tmp_path):
    """A NaN passed every FloatRange bound (its comparisons are false), then failed later as an evaluation or
    training error, or not at all; an unknown stemmer was a data error."""
    from click.testing import CliRunner

    from splade_obs.data import DEMO_RETRIEVAL_DIR

    data = str(DEMO_RETRIEVAL_DIR)
    for args, flag in ((["evaluate", "--data", data, "--idf-power", "nan"], "--idf-power"),
                       (["evaluate", "--data", data, "--progress-interval", "nan"], "--progress-interval"),
                       (["adapt", "--corpus", data, "--output", str(tmp_path / "a"), "--learning-rate", "nan"],
                        "--learning-rate")):
        result = CliRunner().invoke(_cli(), args)
        assert result.exit_code == 2, (args, result.output)
        assert f"Invalid value for '{flag}': nan is not a finite number" in result.output, result.output
    result = CliRunner().invoke(_cli(), ["mine-negatives", "--method", "bm25", "--data", data, "--split", "test",
                                         "--output", str(tmp_path / "m.jsonl"), "--stemmer", "klingon"])
    assert result.exit_code == EXIT_CODES[ErrorCategory.CONFIG_ERROR], result.output
    assert result.stderr.startswith("error[CONFIG_ERROR]: --stemmer klingon: no Snowball stemmer"), result.stderr
    assert "english" in result.stderr and not (tmp_path / "m.jsonl").exists()


def test_judged_queries_without_a_text_are_named_when_left_out(tmp_path, caplog):
    """A query judged in qrels but absent from queries.jsonl was left out of evaluation, training and mining
    without a word (evaluate went from 101 to 100 queries): now one warning names how many and which."""
    import shutil

    from splade_obs.beir import load_beir
    from splade_obs.data import DEMO_RETRIEVAL_DIR

    data = tmp_path / "beir"
    shutil.copytree(DEMO_RETRIEVAL_DIR, data)
    lines = (data / "queries.jsonl").read_text().splitlines(keepends=True)
    dropped = json.loads(lines[0])["_id"]
    (data / "queries.jsonl").write_text("".join(lines[1:]))
    with caplog.at_level("WARNING", logger="splade_obs.beir"):
        beir = load_beir(data, "test")
    assert dropped in beir.qrels and dropped not in beir.queries
    (record,) = [r for r in caplog.records if "judged" in r.getMessage()]
    assert f"1 judged query has no text in queries.jsonl ({dropped}); left out" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="splade_obs.beir"):
        load_beir(DEMO_RETRIEVAL_DIR, "test")  # a whole folder: no warning
    assert not [r for r in caplog.records if "judged" in r.getMessage()]


def test_a_truncated_model_file_names_the_file(tmp_path, tiny_model_path):
    """safetensors said "Error while deserializing header: incomplete metadata", naming neither the file nor
    the cause, under a hint about hub ids."""
    import shutil

    from click.testing import CliRunner

    from splade_obs.data import DEMO_RETRIEVAL_DIR

    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as fh:  # fault injection: a copy cut short
        fh.truncate(weights.stat().st_size // 2)
    result = CliRunner().invoke(_cli(), ["encode", "--model", str(model), "--input",
                                         str(DEMO_RETRIEVAL_DIR / "queries.jsonl"), "--kind", "queries",
                                         "--output", str(tmp_path / "q.jsonl")])
    assert result.exit_code == EXIT_CODES[ErrorCategory.MODEL_ERROR], result.output
    assert result.stderr.startswith(f"error[MODEL_ERROR]: {weights}: model weights are truncated"), result.stderr
    assert "hub ids" not in result.stderr and "damaged" in result.stderr
