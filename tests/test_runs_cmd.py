"""``splade-obs runs list`` / ``runs compare``: run ids by unique prefix, every differing param, typed errors.

One sqlite store per module holds two real short training runs (different learning rate, a fault injected and
eval settings changed in the second) in experiment ``cmp``, and fifteen runs made with MlflowClient in a second
experiment, so that (17 ids, 16 hex digits) at least two ids share their first character: ambiguity is checked
with a 1-character minimum prefix length, since ids are random and rarely share 4 characters.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import pytest
from click.testing import CliRunner

from splade_obs.errors import EXIT_CODES, ConfigError, ErrorCategory

CONFIG_EXIT = EXIT_CODES[ErrorCategory.CONFIG_ERROR]
N_SYNTHETIC = 15


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, Any]:
    from mlflow import MlflowClient

    from splade_obs_cli.main import cli
    from tests.conftest import TINY_ARGS

    tmp = tmp_path_factory.mktemp("runs-cmd")
    uri = f"sqlite:///{tmp}/m.db"
    base = ["train", "--max-steps", "3", *TINY_ARGS, "--otel-exporter", "none", "--progress", "none",
            "--tracking-uri", uri, "--experiment-name", "cmp"]
    for name, extra in (("a", []), ("b", ["--learning-rate", "1e-4", "--inject-fault", "batch:2:nan",
                                          "--eval-idf-power", "0.5", "--eval-split", "dev"])):
        res = CliRunner().invoke(cli, [*base, "--output-dir", str(tmp / name), "--run-name", f"run-{name}", *extra],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output[-3000:]
    client = MlflowClient(tracking_uri=uri)
    real = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("cmp").experiment_id])}
    other = client.create_experiment("other")
    synthetic = []
    for i in range(N_SYNTHETIC):
        rid = client.create_run(other, run_name=f"syn-{i}").info.run_id
        if i == 0:  # same learning rate as run-a, and a param no real run has
            client.log_param(rid, "optim.learning_rate", real["run-a"].data.params["optim.learning_rate"])
            client.log_param(rid, "extra.note", "synthetic")
        client.set_terminated(rid)
        synthetic.append(rid)
    return {"uri": uri, "client": client, "a": real["run-a"], "b": real["run-b"], "synthetic": synthetic,
            "all_ids": [real["run-a"].info.run_id, real["run-b"].info.run_id, *synthetic]}


def _invoke(*args: str) -> Any:
    from splade_obs_cli.main import cli
    return CliRunner().invoke(cli, ["runs", *args])


def _param_marks(output: str, keys: set[str]) -> dict[str, str]:
    """``{param: "*" or " "}`` for each param row of a compare table."""
    marks = {}
    for line in output.splitlines():
        if line[:2] in ("* ", "  ") and line[2:].split()[:1] and line[2:].split()[0] in keys:
            marks[line[2:].split()[0]] = line[0]
    return marks


def _unique_prefix(run_id: str, ids: list[str], at_least: int = 4) -> str:
    n = at_least
    while any(other != run_id and other.startswith(run_id[:n]) for other in ids):
        n += 1
    return run_id[:n]


def _error_lines(res: Any) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- runs list
def test_list_prints_short_ids_that_compare_accepts(store):
    res = _invoke("list", "--tracking-uri", store["uri"], "--experiment-name", "cmp")
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.stdout.splitlines()[2:]]
    printed = {row[1]: row[0] for row in rows}
    assert printed == {"run-a": store["a"].info.run_id[:8], "run-b": store["b"].info.run_id[:8]}

    res = _invoke("compare", printed["run-a"], printed["run-b"], "--tracking-uri", store["uri"])
    assert res.exit_code == 0, res.output
    header = res.stdout.splitlines()[0]
    assert f"run-a ({printed['run-a']})" in header and f"run-b ({printed['run-b']})" in header

    full = _invoke("list", "--tracking-uri", store["uri"], "--experiment-name", "cmp", "--full-ids")
    assert {line.split()[0] for line in full.stdout.splitlines()[2:]} == {store["a"].info.run_id,
                                                                         store["b"].info.run_id}


def test_short_ids_grow_until_the_listed_ids_differ():
    from splade_obs_cli.runs_cmd import short_ids

    ids = ["abcdef0123" + "0" * 22, "abcdef0124" + "0" * 22, "12345678" + "f" * 24]
    assert short_ids(ids) == ["abcdef0123", "abcdef0124", "12345678ff"]
    assert short_ids(ids[2:]) == ["12345678"]


# ------------------------------------------------------------------------------------------ runs compare
def test_compare_shows_every_differing_param_and_hides_equal_ones(store):
    a, b = store["a"], store["b"]
    keys = set(a.data.params) | set(b.data.params)
    differing = {k for k in keys if a.data.params.get(k) != b.data.params.get(k)}
    # the settings changed by the fixture are among them (fault injection, eval.*, learning rate)
    assert {"optim.learning_rate", "recovery.inject_faults", "eval.eval_idf_power", "eval.eval_split"} <= differing
    assert len(keys - differing) > 20

    res = _invoke("compare", a.info.run_id[:6], b.info.run_id[:6], "--tracking-uri", store["uri"])
    assert res.exit_code == 0, res.output
    marks = _param_marks(res.stdout, keys)
    assert marks == {k: "*" for k in differing}
    row = next(line for line in res.stdout.splitlines() if line.startswith("* optim.learning_rate "))
    assert row.split()[2:] == [a.data.params["optim.learning_rate"], b.data.params["optim.learning_rate"]]
    assert f"{len(differing)} params differ; {len(keys - differing)} equal in every run not shown" in res.stdout
    assert any(line.startswith(("* epoch/loss", "  epoch/loss")) for line in res.stdout.splitlines())

    res = _invoke("compare", a.info.run_id, b.info.run_id, "--tracking-uri", store["uri"], "--all-params")
    assert res.exit_code == 0, res.output
    assert _param_marks(res.stdout, keys) == {k: "*" if k in differing else " " for k in keys}
    assert "not shown" not in res.stdout


def test_a_param_one_run_lacks_differs_and_runs_of_any_experiment_resolve(store):
    a, syn = store["a"], store["synthetic"][0]
    keys = set(a.data.params) | {"extra.note"}
    res = _invoke("compare", _unique_prefix(a.info.run_id, store["all_ids"]),
                  _unique_prefix(syn, store["all_ids"]), "--tracking-uri", store["uri"])
    assert res.exit_code == 0, res.output
    marks = _param_marks(res.stdout, keys)
    assert marks == {k: "*" for k in keys - {"optim.learning_rate"}}  # the one shared value is hidden
    assert next(line for line in res.stdout.splitlines() if line.startswith("* extra.note")).split()[2:] == \
        ["-", "synthetic"]
    assert next(line for line in res.stdout.splitlines() if line.startswith("* model.name")).split()[2:] == \
        [a.data.params["model.name"], "-"]


def test_one_run_shows_all_its_params(store):
    a = store["a"]
    res = _invoke("compare", a.info.run_id[:10], "--tracking-uri", store["uri"])
    assert res.exit_code == 0, res.output
    assert _param_marks(res.stdout, set(a.data.params)) == {k: " " for k in a.data.params}
    assert "differ" not in res.stdout


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_ids_are_config_errors_naming_the_id(store):
    ids = store["all_ids"]
    unused = next(p for p in (c * 8 for c in "0123456789abcdef") if not any(i.startswith(p) for i in ids))
    for ref in ("0" * 32 if "0" * 32 not in ids else "f" * 32, unused, "zzzzzz"):
        res = _invoke("compare", store["a"].info.run_id[:8], ref, "--tracking-uri", store["uri"])
        assert res.exit_code == CONFIG_EXIT, res.output
        lines = _error_lines(res)
        assert len(lines) == 2 and "Traceback" not in res.output and "FILE_SYSTEM_ERROR" not in res.output
        assert lines[0].startswith("error[CONFIG_ERROR]: ") and f"'{ref}' not found" in lines[0]
        assert lines[1].startswith("hint: ") and "splade-obs runs list" in lines[1]


def test_a_prefix_under_the_minimum_is_refused(store):
    res = _invoke("compare", store["a"].info.run_id[:3], "--tracking-uri", store["uri"])
    assert res.exit_code == CONFIG_EXIT, res.output
    assert _error_lines(res)[0].startswith("error[CONFIG_ERROR]: ") and "at least 4 characters" in res.stderr


def _shared_first_char(ids: list[str]) -> tuple[str, list[str]]:
    char, n = Counter(i[0] for i in ids).most_common(1)[0]
    assert n >= 2  # 17 ids over 16 hex digits
    return char, sorted(i for i in ids if i.startswith(char))


def test_an_ambiguous_prefix_lists_the_candidates(store, monkeypatch):
    from splade_obs_cli import runs_cmd

    char, matching = _shared_first_char(store["all_ids"])
    with pytest.raises(ConfigError) as info:
        runs_cmd.resolve_run_id(store["client"], char, store["uri"], min_length=1)
    assert info.value.category is ErrorCategory.CONFIG_ERROR
    assert f"{len(matching)} runs start with it" in info.value.message
    assert [line.split()[0] for line in info.value.details()] == matching[:runs_cmd.MAX_CANDIDATES_SHOWN]

    monkeypatch.setattr(runs_cmd, "MIN_PREFIX_LEN", 1)
    res = _invoke("compare", char, "--tracking-uri", store["uri"])
    assert res.exit_code == CONFIG_EXIT, res.output
    lines = _error_lines(res)
    assert lines[0].startswith(f"error[CONFIG_ERROR]: run id prefix '{char}' is ambiguous")
    assert all(rid in res.stderr for rid in matching[:runs_cmd.MAX_CANDIDATES_SHOWN])
    assert lines[-1] == "hint: give more characters of the run id"


def test_prefix_search_pages_through_experiments_and_runs(store, monkeypatch):
    """Page size 1 and one experiment per search: every page and chunk must be read to find the matches."""
    from splade_obs_cli import runs_cmd

    monkeypatch.setattr(runs_cmd, "PAGE_SIZE", 1)
    monkeypatch.setattr(runs_cmd, "EXPERIMENTS_PER_SEARCH", 1)
    client, ids = store["client"], store["all_ids"]
    assert len(runs_cmd._experiment_ids(client)) == 3  # Default, cmp, other
    char, matching = _shared_first_char(ids)
    assert sorted(r.info.run_id for r in runs_cmd._runs_with_prefix(client, char)) == matching
    for rid in itertools.islice(ids, 0, None, 4):
        assert runs_cmd.resolve_run_id(client, _unique_prefix(rid, ids).upper(), store["uri"]) == rid


def test_reading_a_missing_sqlite_store_creates_nothing(tmp_path):
    """``runs list --tracking-uri sqlite:///<typo>`` made the folder and an empty store, then listed nothing
    with exit 0; now the file system error's code, naming the path, and nothing is created."""
    from splade_obs_cli.main import cli

    db = tmp_path / "nosuchdir" / "x.db"
    for args in (["runs", "list"], ["runs", "compare", "abcd1234"]):
        result = CliRunner().invoke(cli, [*args, "--tracking-uri", f"sqlite:///{db}"])
        assert result.exit_code == EXIT_CODES[ErrorCategory.FILE_SYSTEM_ERROR], result.output
        assert result.stderr.startswith(f"error[FILE_SYSTEM_ERROR]: {db}: no MLflow store here"), result.stderr
    assert not (tmp_path / "nosuchdir").exists()
