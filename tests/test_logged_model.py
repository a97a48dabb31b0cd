"""The trained models as MLflow 3 LoggedModels (``splade_obs/sinks/mlflow/logged_model.py``, ``model_code.py``).

A real ``splade-obs train`` (CliRunner, real splade-tiny, in-training evaluation with ``--save-best-metric``
and ``--register-model``) on a sqlite store: the final and best models are LoggedModels of the run at their
steps, with the evaluation's metrics, a signature and an input example; the best one is registered. The
final model loads in a Python that cannot import splade_obs and encodes as ``SpladeEncoder`` does.
A synthetic run through a real bus (real model folders) covers the model card, a transient failure in the
middle of an upload, a refused upload, ``--no-log-model``, and registration through a real ``mlflow server``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from splade_obs.events import CheckpointSaved, EvaluationDone, RunFinished, RunStarted
from splade_obs.hub import resolve_model
from splade_obs.sinks.mlflow import logged_model
from tests._eval_utils import write_beir
from splade_obs.sinks.mlflow import MlflowSink
from tests._mlflow_utils import artifact_paths, make_cfg, mlflow_server, open_bus, options_for, run_events

pytestmark = pytest.mark.timeout(600)

TEXTS = ["hormone that controls blood sugar", "which programming language is safe", "coffee"]


def _client(uri: str):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _models(client, run) -> dict[str, object]:
    found = client.search_logged_models([run.info.experiment_id])
    return {m.name: m for m in found if m.source_run_id == run.info.run_id}


def _local(uri: str) -> Path:
    return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))


def _mlflow_globals() -> tuple:
    import mlflow.models.model as model_module
    from mlflow.tracking._tracking_service import utils

    return (os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri, model_module.__mlflow_model__,
            sorted(m for m in sys.modules if m.startswith("code_model_")))


# ------------------------------------------------------------------------------------ a real training
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``splade-obs train`` with an evaluation every 2 steps, ``--save-best-metric`` and ``--register-model``."""
    from click.testing import CliRunner
    from splade_obs_cli.main import cli
    from tests.conftest import TINY_ARGS

    tmp = tmp_path_factory.mktemp("logged-model")
    uri = f"sqlite:///{tmp}/m.db"
    beir = write_beir(tmp / "beir")
    before = _mlflow_globals()
    res = CliRunner().invoke(cli, [
        "train", "--max-steps", "5", *TINY_ARGS, "--otel-exporter", "none", "--progress", "none",
        "--output-dir", str(tmp / "out"), "--tracking-uri", uri, "--experiment-name", "lm",
        "--eval-data", str(beir), "--eval-steps", "2", "--save-best-metric", "ndcg@10",
        "--register-model", "splade-lm"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    client = _client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lm").experiment_id])
    return {"uri": uri, "client": client, "run": run, "out": tmp / "out", "globals": (before, _mlflow_globals())}


def test_final_and_best_models_are_logged_models_of_the_run_at_their_steps(trained):
    client, run, out = trained["client"], trained["run"], trained["out"]
    models = _models(client, run)
    assert set(models) == {"splade_model", "best_model"}
    final, best = models["splade_model"], models["best_model"]
    best_step = json.loads((out / "best" / "metrics.json").read_text())["step"]
    assert run.data.tags["splade.final_step"] == "5"
    outputs = {(o.model_id, o.step) for o in run.outputs.model_outputs}
    assert outputs == {(final.model_id, 5), (best.model_id, best_step)}
    for m, kind, step in ((final, "final", 5), (best, "best", best_step)):
        assert str(m.status).endswith("READY") and m.model_type == "splade-sparse-encoder"
        assert m.tags["splade.model_kind"] == kind and m.tags["splade.step"] == str(step)
        assert m.tags["splade.max_length"] == "32" and m.tags["splade.base_model"] == "splade-tiny"
        assert m.params["optim.batch_size"] == "4" == run.data.params["optim.batch_size"]  # the run's params
    assert best.tags["splade.best_metric"] == "ndcg@10"
    # the experiment's Models tab lists them (what the UI asks for: the experiment's logged models)
    assert {m.model_id for m in client.search_logged_models([run.info.experiment_id])} == {final.model_id,
                                                                                            best.model_id}


def test_nothing_global_is_changed_for_the_caller(trained):
    before, after = trained["globals"]
    assert before == after


def test_the_models_carry_their_evaluation_without_duplicating_the_run_history(trained):
    client, run, out = trained["client"], trained["run"], trained["out"]
    models = _models(client, run)
    saved_best = json.loads((out / "best" / "metrics.json").read_text())
    best_metrics = {m.key: m for m in models["best_model"].metrics}
    assert best_metrics["eval/ndcg_at_10"].value == pytest.approx(saved_best["ndcg@10"])
    assert best_metrics["eval/ndcg_at_10"].step == saved_best["step"]
    assert models["best_model"].tags["splade.best_metric_value"] == repr(float(saved_best["ndcg@10"]))
    final_metrics = {m.key: m for m in models["splade_model"].metrics}
    history = {m.step: m for m in client.get_metric_history(run.info.run_id, "eval/ndcg_at_10")}
    assert final_metrics["eval/ndcg_at_10"].step == 5
    assert final_metrics["eval/ndcg_at_10"].value == history[5].value
    assert final_metrics["eval/ndcg_at_10"].timestamp == history[5].timestamp   # the run's own point, linked
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/ndcg_at_10")]
    assert steps == [2, 4, 5]                                                   # once each, none added
    assert all(m.model_id == models["splade_model"].model_id for m in models["splade_model"].metrics)


def test_signature_input_example_and_requirements(trained):
    from mlflow.models import Model

    client, run = trained["client"], trained["run"]
    final = _models(client, run)["splade_model"]
    folder = _local(final.artifact_location)
    mlmodel = Model.load(folder / "MLmodel")
    sig = mlmodel.signature.to_dict()
    assert json.loads(sig["inputs"]) == [{"type": "string", "required": True}]
    assert json.loads(sig["outputs"]) == [{"type": "map", "values": {"type": "double"}, "required": True}]
    params = {p["name"]: p["default"] for p in json.loads(sig["params"])}
    assert params == {"max_length": None, "top_k": None}      # None: the model config's value
    assert mlmodel.model_id == final.model_id and mlmodel.run_id == run.info.run_id
    example = json.loads((folder / mlmodel.saved_input_example_info["artifact_path"]).read_text())
    assert example["columns"] == ["text"] and len(example["data"]) == 2
    flavor = mlmodel.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert flavor["config"] == {"max_length": 32, "top_k": None}
    reqs = (folder / "requirements.txt").read_text().splitlines()
    names = {r.split("==")[0] for r in reqs if "==" in r}
    assert {"torch", "transformers", "mlflow", "numpy", "pandas"} <= names
    assert not [r for r in reqs if "splade" in r.lower()]
    assert (folder / "artifacts").is_dir() and any((folder / "artifacts").rglob("model.safetensors"))


def test_register_model_registers_the_best_model(trained):
    client, run = trained["client"], trained["run"]
    best = _models(client, run)["best_model"]
    (version,) = client.search_model_versions("name='splade-lm'")
    assert version.run_id == run.info.run_id and version.tags["splade.model_kind"] == "best"
    # sqlite: the LoggedModel's own files (MLflow's SQL registry resolves models:/ through the global URI)
    assert version.source == best.artifact_location
    assert client.get_model_version_download_uri("splade-lm", version.version) == best.artifact_location
    assert run.data.tags["splade.registered_model"] == f"splade-lm/{version.version}"


def test_the_logged_model_loads_and_encodes_without_splade_obs(trained, tmp_path):
    """``python -S`` with only the venv's site-packages on the path: the editable install's .pth (which puts
    the repository on sys.path) is not read, so ``import splade_obs`` fails there; the model still loads
    through ``models:/<id>`` and gives SpladeEncoder's weights. (Where splade-obs is installed into
    site-packages itself, not editable, a meta-path finder refuses it in that interpreter instead.)"""
    from splade_obs.model import SpladeEncoder, sparse_to_dict

    client, run, out = trained["client"], trained["run"], trained["out"]
    final = _models(client, run)["splade_model"]
    purelib = sysconfig.get_paths()["purelib"]
    refuse = (Path(purelib) / "splade_obs").is_dir()
    script = tmp_path / "load.py"
    script.write_text(
        "import json, sys\n"
        + ("class Refuse:\n    def find_spec(self, name, path=None, target=None):\n"
           "        if name.split('.')[0] in ('splade_obs', 'splade_obs_cli'):\n"
           "            raise ModuleNotFoundError(name)\n"
           "sys.meta_path.insert(0, Refuse())\n" if refuse else "") +
        "try:\n    import splade_obs\nexcept ImportError:\n    pass\nelse:\n    sys.exit(3)\n"
        "import mlflow.pyfunc, pandas as pd\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        f"texts = {TEXTS!r}\n"
        "out = {'list': m.predict(texts), 'frame': m.predict(pd.DataFrame({'text': texts})),\n"
        "       'top5': m.predict(texts, params={'top_k': 5}),\n"
        "       'config3': mlflow.pyfunc.load_model(sys.argv[1], model_config={'top_k': 3}).predict(texts),\n"
        "       'splade': sorted(k for k in sys.modules if k.startswith('splade'))}\n"
        "print('RESULT' + json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=purelib, MLFLOW_TRACKING_URI=trained["uri"],
               MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-S", str(script), f"models:/{final.model_id}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 3, "splade_obs was importable in the isolated interpreter"
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert got["splade"] == []
    assert got["list"] == got["frame"]
    assert [len(t) for t in got["config3"]] == [3, 3, 3]                  # model_config given to load_model
    assert [list(t) for t in got["config3"]] == [list(t)[:3] for t in got["list"]]

    enc = SpladeEncoder.from_pretrained(str(out / "final"))
    for key, top_k in (("list", None), ("top5", 5)):
        want = enc.encode(TEXTS, max_length=32, top_k=top_k)
        for i, text in enumerate(TEXTS):
            expected, actual = sparse_to_dict(want[i], enc.tokenizer), got[key][i]
            assert actual and list(actual)[:5] == list(expected)[:5], text           # same heaviest terms
            if top_k:
                assert len(actual) == len(expected) == top_k
            diff = max(abs(actual.get(t, 0.0) - expected.get(t, 0.0)) for t in set(actual) | set(expected))
            assert diff < 1e-3, (text, diff)


# --------------------------------------------------------------------------------------- synthetic runs
def _tiny_copy(dest: Path, readme: str | None = None) -> str:
    shutil.copytree(resolve_model("splade-tiny"), dest)
    if readme is not None:
        (dest / "README.md").write_text(readme, encoding="utf-8")
    return str(dest)


def _events_with_best(cfg, final_dir: str, best_dir: str) -> list:
    """``run_events`` (steps 1-6, evaluation at 6) with a best evaluation and its checkpoint at step 4."""
    events = run_events(cfg, model_path=final_dir)
    started = events[0]
    config = {**started.config, "eval": {**started.config.get("eval", {}), "save_best_metric": "ndcg@10"}}
    events[0] = dataclasses.replace(started, config=config)
    at = next(i for i, e in enumerate(events) if getattr(e, "step", None) == 4) + 1
    events[at:at] = [EvaluationDone(step=4, epoch=1, split="test", scores={"ndcg@10": 0.4, "mrr@10": 0.3},
                                    duration_seconds=1.0, is_best=True),
                     CheckpointSaved(step=4, epoch=0, path=best_dir, reason="best", duration_seconds=0.1)]
    assert isinstance(events[0], RunStarted) and isinstance(events[-1], RunFinished)
    return events


def _run(cfg, events):
    """Feed ``events`` through a real bus to a sink that may take its time at the end (model uploads)."""
    sink = MlflowSink.create(dataclasses.replace(options_for(cfg), shutdown_timeout=120.0))
    assert sink is not None
    bus, ids = open_bus(sink)
    for e in events:
        bus.emit(e)
    bus.close(timeout=120)
    client = _client(cfg.tracking.tracking_uri)
    return client, client.get_run(ids.mlflow_run_id), sink


def test_the_model_card_is_the_description_of_the_model_and_of_the_version(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLADE_TEST_API_TOKEN", "tok-123456789")
    cfg = make_cfg(tmp_path, register_model="carded")
    final_dir = _tiny_copy(tmp_path / "final", "# Final model\nTrained for the test. token tok-123456789")
    best_dir = _tiny_copy(tmp_path / "best", "# Best model\n" + "x" * 9000)
    client, run, _ = _run(cfg, _events_with_best(cfg, final_dir, best_dir))
    models = _models(client, run)
    final_note = models["splade_model"].tags["mlflow.note.content"]
    assert final_note.startswith("# Final model") and "tok-123456789" not in final_note and "***" in final_note
    best_note = models["best_model"].tags["mlflow.note.content"]
    assert best_note.startswith("# Best model") and len(best_note) <= 8000 and best_note.endswith("files]")
    (version,) = client.search_model_versions("name='carded'")
    assert version.tags["splade.model_kind"] == "best" and version.description.startswith("# Best model")
    assert len(version.description) <= 5000
    assert [o.step for o in run.outputs.model_outputs if o.model_id == models["best_model"].model_id] == [4]


def test_a_transient_failure_mid_upload_resumes_without_a_second_model(tmp_path, monkeypatch):
    """The store drops the connection on the first file upload: the queued call is retried and goes on from
    there (one LoggedModel, READY); the best model's upload is refused for good: it is FAILED, and
    registration falls back to the final model."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    calls: list[str] = []
    real = MlflowClient.log_model_artifacts

    def flaky(self, model_id, local_dir, artifact_path=None):
        name = self.get_logged_model(model_id).name
        calls.append(name)
        if name == "splade_model" and calls.count(name) == 1:
            raise ConnectionError("connection reset by peer")
        if name == "best_model":
            raise MlflowException.invalid_parameter_value("artifact store says no")
        return real(self, model_id, local_dir, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_model_artifacts", flaky)
    cfg = make_cfg(tmp_path, register_model="flaky")
    client, run, sink = _run(cfg, _events_with_best(cfg, _tiny_copy(tmp_path / "final"),
                                                    _tiny_copy(tmp_path / "best")))
    found = client.search_logged_models([run.info.experiment_id])
    assert sorted(m.name for m in found) == ["best_model", "splade_model"]   # one each, none twice
    by_name = {m.name: m for m in found}
    assert calls == ["splade_model", "splade_model", "best_model"]
    assert str(by_name["splade_model"].status).endswith("READY")
    assert str(by_name["best_model"].status).endswith("FAILED")
    assert "log_model_best" in sink.transport.refused_ops
    (version,) = client.search_model_versions("name='flaky'")
    assert version.tags["splade.model_kind"] == "final"
    assert version.source == by_name["splade_model"].artifact_location


def test_a_resumed_run_without_a_new_best_registers_the_best_logged_before(tmp_path):
    """First process: best at step 4, final at 6, nothing registered. The resumed process (steps 7-8, no
    better evaluation) logs its own final model at step 8 and registers the run's earlier best model."""
    cfg = make_cfg(tmp_path)
    client, run, _ = _run(cfg, _events_with_best(cfg, _tiny_copy(tmp_path / "final"), _tiny_copy(tmp_path / "best")))
    first = _models(client, run)
    resumed = make_cfg(tmp_path, register_model="resumed")
    events = run_events(resumed, steps=range(7, 9), start_step=6, model_path=_tiny_copy(tmp_path / "final-8"))
    sink = MlflowSink.create(dataclasses.replace(options_for(resumed), shutdown_timeout=120.0),
                             resume_run_id=run.info.run_id)
    bus, _ = open_bus(sink)
    for e in events:
        bus.emit(e)
    bus.close(timeout=120)
    run = client.get_run(run.info.run_id)
    logged = client.search_logged_models([run.info.experiment_id])
    (second,) = [m for m in logged if m.name == "splade_model" and m.model_id != first["splade_model"].model_id]
    assert len(logged) == 3
    assert sorted((o.step, o.model_id) for o in run.outputs.model_outputs) == [
        (4, first["best_model"].model_id), (6, first["splade_model"].model_id), (8, second.model_id)]
    (version,) = client.search_model_versions("name='resumed'")
    assert version.source == first["best_model"].artifact_location and version.tags["splade.model_kind"] == "best"


def test_no_log_model_logs_no_logged_model_but_the_hf_files(tmp_path):
    cfg = make_cfg(tmp_path, log_model=False, register_model="unused")
    client, run, _ = _run(cfg, _events_with_best(cfg, _tiny_copy(tmp_path / "final"), _tiny_copy(tmp_path / "best")))
    assert client.search_logged_models([run.info.experiment_id]) == []
    assert "model/hf/config.json" in artifact_paths(client, run.info.run_id)
    assert client.search_registered_models() == []


@pytest.mark.server
def test_registration_through_a_server_uses_a_models_uri_and_shows_the_schema(tmp_path):
    """Through a real ``mlflow server``: the version's source is ``models:/<best model id>``, and the file the
    UI reads for the version's schema (``model-versions/get-artifact?path=MLmodel``) has the signature."""
    with mlflow_server(tmp_path) as (url, _proc, _db):
        cfg = make_cfg(tmp_path, uri=url, register_model="served")
        events = _events_with_best(cfg, _tiny_copy(tmp_path / "final"), _tiny_copy(tmp_path / "best"))
        events[-1] = dataclasses.replace(events[-1], model_path=None)  # the best model only: one upload
        client, run, _ = _run(cfg, events)
        models = _models(client, run)
        assert list(models) == ["best_model"] and str(models["best_model"].status).endswith("READY")
        (version,) = client.search_model_versions("name='served'")
        assert version.source == f"models:/{models['best_model'].model_id}"
        assert version.run_id == run.info.run_id
        query = urllib.parse.urlencode({"path": "MLmodel", "name": "served", "version": version.version})
        with urllib.request.urlopen(f"{url}/model-versions/get-artifact?{query}", timeout=30) as r:
            mlmodel = r.read().decode()
        assert "signature:" in mlmodel and '"type": "map"' in mlmodel and models["best_model"].model_id in mlmodel
        assert run.data.tags["splade.registered_model"] == f"served/{version.version}"


def test_specs_of_a_run_without_an_evaluation_of_the_final_step(tmp_path):
    """The final model is linked to the last evaluation only when that evaluation was of the final step; a
    best checkpoint whose folder is gone is not logged."""
    final_dir = _tiny_copy(tmp_path / "final")
    ev = EvaluationDone(step=4, epoch=1, split="test", scores={"ndcg@10": 0.5}, duration_seconds=1.0, is_best=True)
    points = logged_model.eval_points(ev)
    assert ("eval/ndcg_at_10", 0.5, 4, ev.time_ns // 1_000_000) in points
    gone = CheckpointSaved(step=4, epoch=0, path=str(tmp_path / "nowhere"), reason="best", duration_seconds=0.1)
    specs = logged_model.run_model_specs(final_path=final_dir, final_step=6, config={"model": {"top_k": 64}},
                                         params={"a": "1"}, last_eval=(ev, points), best_eval=(ev, points),
                                         best_checkpoint=gone)
    assert [(s.name, s.kind, s.step, s.metrics, s.top_k, s.max_length) for s in specs] == [
        ("splade_model", "final", 6, [], 64, 128)]
