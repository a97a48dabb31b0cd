"""Sinks from other packages: the ``splade_obs.sinks`` entry point group, ``--sink NAME`` and ``train(sinks=[NAME])``.

A tiny real package is built and installed with pip into a folder under tmp_path (``--target``), never into the
shared venv; the CLI runs in a subprocess with that folder on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from splade_obs.errors import EXIT_CODES, ConfigError, ErrorCategory

from .conftest import REPO, TINY_ARGS

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "splade-obs-demo-recorder"
version = "0.0.1"

[project.entry-points."splade_obs.sinks"]
demo-recorder = "demo_recorder_sink:DemoRecorder"
not-a-sink = "demo_recorder_sink:not_a_sink"

[tool.setuptools]
py-modules = ["demo_recorder_sink"]
"""

MODULE = '''\
"""A third-party sink: every event as one JSON line in the file named by $DEMO_RECORDER_OUT."""
import json
import os

from splade_obs import Sink


class DemoRecorder(Sink):
    name = "demo-recorder"

    def __init__(self):
        self.file = open(os.environ["DEMO_RECORDER_OUT"], "w", encoding="utf-8")

    def handle(self, event):
        self.file.write(json.dumps(event.to_dict(), default=str, sort_keys=True) + "\\n")

    def close(self, timeout=5.0):
        self.file.close()


def not_a_sink():
    return "a string"
'''


def as_lines(events: list) -> list[dict]:
    """Events as the plugin writes them (JSON, read back)."""
    return [json.loads(json.dumps(e.to_dict(), default=str, sort_keys=True)) for e in events]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo sink package, built and installed with pip into its own folder."""
    root = tmp_path_factory.mktemp("plugin")
    src, site = root / "src", root / "site"
    src.mkdir()
    (src / "pyproject.toml").write_text(PYPROJECT, encoding="utf-8")
    (src / "demo_recorder_sink.py").write_text(MODULE, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-index", "--quiet", "--target", str(site), str(src)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"pip could not install the demo sink package:\n{proc.stderr[-3000:]}")
    assert list(site.glob("splade_obs_demo_recorder-*.dist-info/entry_points.txt"))
    return site


def _cli(site: Path, args: list[str], out: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "DEMO_RECORDER_OUT": str(out),
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    code = "from splade_obs_cli.main import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def run_args(output_dir: Path) -> list[str]:
    return ["train", *TINY_ARGS, "--max-steps", "3", "--seed", "7", "--output-dir", str(output_dir),
            "--no-mlflow", "--otel-exporter", "none", "--progress", "none"]


def test_entry_point_sink_gets_the_same_events_as_the_recording_sink(plugin_site: Path, tmp_path: Path,
                                                                     tiny_cfg, monkeypatch) -> None:
    from splade_obs import RecordingSink, train
    from splade_obs.plugins import available_sinks

    # 1. the CLI, in its own process: --sink enables the installed sink by name
    cli_out = tmp_path / "cli_events.jsonl"
    proc = _cli(plugin_site, [*run_args(tmp_path / "cli_run"), "--sink", "demo-recorder"], cli_out, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_cli = read_lines(cli_out)

    # 2. the API, in this process: the same sink by name next to the built-in RecordingSink
    monkeypatch.syspath_prepend(str(plugin_site))
    assert "demo-recorder" in available_sinks()
    api_out = tmp_path / "api_events.jsonl"
    monkeypatch.setenv("DEMO_RECORDER_OUT", str(api_out))
    rec = RecordingSink()
    result = train(tiny_cfg(checkpoint={"output_dir": str(tmp_path / "api_run")}), sinks=["demo-recorder", rec])
    assert result.status == "FINISHED"
    from_api = read_lines(api_out)
    assert from_api == as_lines(rec.events)  # every event, in order, field for field

    kinds = [e["event"] for e in from_cli]
    assert kinds == [e.kind for e in rec.events]  # the CLI's run delivered the same sequence
    assert kinds.count("step_done") == 3 and kinds[-1] == "run_finished"
    assert [e.get("step") for e in from_cli] == [e.get("step") for e in from_api]


def test_unknown_or_broken_sink_names_are_config_errors(plugin_site: Path, tmp_path: Path, monkeypatch) -> None:
    proc = _cli(plugin_site, [*run_args(tmp_path / "run"), "--sink", "demo-recordr"], tmp_path / "x.jsonl", tmp_path)
    assert proc.returncode == EXIT_CODES[ErrorCategory.CONFIG_ERROR], proc.stderr[-3000:]
    assert "--sink 'demo-recordr' is not an installed sink; available: demo-recorder, not-a-sink" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before the run started

    from splade_obs.plugins import load_sink

    monkeypatch.syspath_prepend(str(plugin_site))
    with pytest.raises(ConfigError, match="gave str, not a splade_obs Sink"):
        load_sink("not-a-sink")
    monkeypatch.delenv("DEMO_RECORDER_OUT", raising=False)
    with pytest.raises(ConfigError, match="loading demo_recorder_sink:DemoRecorder failed: KeyError") as info:
        load_sink("demo-recorder")  # its constructor raised: named, with the original error kept
    assert isinstance(info.value.original_exception, KeyError)


def test_sink_help_names_the_entry_point_group() -> None:
    from click.testing import CliRunner

    from splade_obs_cli.main import cli

    out = CliRunner().invoke(cli, ["train", "--help"])
    assert out.exit_code == 0
    assert "--sink NAME" in out.output and "splade_obs.sinks" in out.output
