"""The dashboard stack of docker/ (Prometheus + Grafana) against what the trainer really emits.

No Docker engine runs here, so the files are parsed: the compose file's ``prometheus`` and ``grafana`` services
(ports on 127.0.0.1, health checks, mounted configs), the collector's metrics pipeline (OTLP receiver to the
Prometheus exporter), the Prometheus config (scrapes the collector), Grafana's provisioning (data sources for
Prometheus and the compose file's trace backend, a dashboard provider) and the committed dashboard JSON.

The key check: every metric name in every PromQL expression of the dashboard is a name the trainer emits. The
names come from a real short run (splade-tiny, one injected OOM so the error counters exist) with
``--prometheus-port``, whose ``/metrics`` is read with prometheus_client's own parser. GPU memory gauges exist on
CUDA runs only; their names are derived from the instrument list with the OTel Prometheus exporter's own naming
functions, and that derivation is checked on the CPU run's RSS gauge (same kind and unit).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml
from click.testing import CliRunner

from splade_obs_cli.main import cli
from tests._otlp_receiver import free_port
from tests.conftest import TINY_ARGS

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
COLLECTOR = DOCKER / "otel-collector.yaml"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and",
                   "or", "unless", "inf", "nan"}
CUDA_ONLY = ("splade.gpu.memory.allocated", "splade.gpu.memory.reserved")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def dashboards() -> list[dict]:
    assert DASHBOARDS, "no dashboard JSON under docker/grafana/dashboards"
    return [json.loads(p.read_text(encoding="utf-8")) for p in DASHBOARDS]


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows
    return out


def exprs(dashboard: dict) -> list[str]:
    found = [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append(re.sub(r"label_values\((.*),\s*\w+\)", r"\1", query))
    return found


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers left after removing strings, label matchers, ranges,
    grouping clauses, function calls' names, keywords and numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if re.match(r"\s*\(", text[m.end():]) or m.group(0).lower() in PROMQL_KEYWORDS:
            continue
        if m.start() > 0 and (text[m.start() - 1].isdigit() or text[m.start() - 1] == "$"):
            continue  # 1e3, $__rate_interval
        names.add(m.group(0))
    return names


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.95, sum by (le, run) (rate(a_bucket{x=~"$run"}[$__rate_interval])))'
                        ) == {"a_bucket"}
    assert metric_names('sum without (x) (b_total) / on (y) group_left c + 1e3 or d offset 5m') == {
        "b_total", "c", "d"}


# ---------------------------------------------------------------------------------- a real run's names
def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def emitted(tmp_path_factory) -> dict:
    """One real 6-step run with --prometheus-port (batch 3 an injected OOM, a loss spike at step 5 that the
    health monitor, armed after 3 steps by the config file, raises an alert for); its final /metrics, parsed."""
    from prometheus_client.parser import text_string_to_metric_families

    work = tmp_path_factory.mktemp("dash")
    (work / "health.yaml").write_text("health:\n  min_history: 3\n", encoding="utf-8")
    port = free_port()
    args = ["train", *TINY_ARGS, "--max-steps", "6", "--output-dir", str(work / "out"), "--progress", "none",
            "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--inject-fault", "batch:3:oom",
            "--inject-fault", "step:5:spike", "--config", str(work / "health.yaml"),
            "--prometheus-port", str(port), "--prometheus-linger", "4"]
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=CliRunner().invoke(cli, args)), daemon=True)
    thread.start()
    text, deadline = "", time.monotonic() + 240
    while thread.is_alive() and time.monotonic() < deadline:
        try:
            text = get(f"http://127.0.0.1:{port}/metrics")
        except OSError:
            text = ""
        if "splade_run_duration_seconds" in text:  # set at RunFinished: every final value is in
            break
        time.sleep(0.3)
    thread.join(90)
    run = result.get("r")
    assert run is not None and run.exit_code == 0, run.output if run else "the run did not finish"
    assert "splade_run_duration_seconds" in text, "the endpoint never served the finished run"
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def cuda_only_names() -> set[str]:
    """Series names of the CUDA-only gauges, by the OTel Prometheus exporter's naming functions."""
    from opentelemetry.exporter.prometheus._mapping import map_unit, sanitize_full_name

    from splade_obs.sinks.otel.metrics import EXTRA_INSTRUMENTS

    units = {name: unit for name, _, unit, _, _ in EXTRA_INSTRUMENTS}

    def series(name: str) -> str:
        base, unit = sanitize_full_name(name), map_unit(units[name])
        return base if not unit or base.endswith("_" + unit) else f"{base}_{unit}"

    assert series("process.memory.usage") == "process_memory_usage_bytes"  # the rule, on a CPU-run gauge
    return {series(n) for n in CUDA_ONLY}


def test_the_run_emits_what_the_panels_need(emitted):
    for name in ("splade_train_loss", "splade_train_lr", "splade_train_samples_per_second",
                 "splade_train_tokens_per_second", "splade_train_grad_norm", "splade_train_query_nnz",
                 "splade_train_doc_nnz", "splade_errors_total", "process_memory_usage_bytes",
                 "splade_train_step_duration_seconds_bucket", "splade_alerts_total"):
        assert name in emitted, name
    assert [s.labels["error_category"] for s in emitted["splade_errors_total"]] == ["DEVICE_ERROR"]
    alerts = {s.labels["alert_category"]: s.value for s in emitted["splade_alerts_total"]}
    assert alerts["loss_spike"] == 1.0, alerts  # (3 steps of history are few: a noisy grad norm may alert too)
    assert re.fullmatch(r"[0-9a-f]{32}", emitted["splade_train_loss"][0].labels["mlflow_run_id"])


def test_dashboards_reference_only_metric_names_the_trainer_emits(dashboards, emitted):
    allowed = set(emitted) | cuda_only_names()
    for dash in dashboards:
        used = {n for e in exprs(dash) for n in metric_names(e)}
        assert "splade_train_loss" in used
        assert used <= allowed, f"{dash['title']}: not emitted by the trainer: {sorted(used - allowed)}"


def test_dashboard_labels_exist_on_the_emitted_series(dashboards, emitted):
    """Label names used in matchers, groupings, legends and data links are labels of the real series."""
    from opentelemetry.exporter.prometheus._mapping import sanitize_attribute

    from splade_obs.sinks.otel.metrics import EXTRA_INSTRUMENTS

    labels = {k for series in emitted.values() for s in series for k in s.labels} | {"__name__"}
    labels |= {sanitize_attribute(attr) for name, _, _, attr, _ in EXTRA_INSTRUMENTS if name in CUDA_ONLY}
    for dash in dashboards:
        text = json.dumps(dash)
        used = set(re.findall(r"\b(\w+)=~?\\\"", text)) | set(re.findall(r"\{\{(\w+)\}\}", text))
        used |= set(re.findall(r"__field\.labels\.(\w+)", text))
        for e in exprs(dash):
            for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", e):
                used |= {g.strip() for g in group.split(",") if g.strip()}
        assert used <= labels, f"{dash['title']}: labels not on any series: {sorted(used - labels)}"


# ---------------------------------------------------------------------------------- dashboard content
def panel_exprs(dash: dict, title_word: str) -> str:
    found = [p for p in panels(dash) if title_word.lower() in p["title"].lower()]
    assert found, f"no panel titled with {title_word!r}"
    return " ".join(t["expr"] for p in found for t in p.get("targets", []))


def test_dashboard_has_the_training_panels(dashboards):
    (dash,) = [d for d in dashboards if d["uid"] == "splade-obs-training"]
    assert "splade_train_loss" in panel_exprs(dash, "loss")
    assert "splade_train_lr" in panel_exprs(dash, "learning rate")
    throughput = panel_exprs(dash, "throughput")
    assert "splade_train_samples_per_second" in throughput and "splade_train_tokens_per_second" in throughput
    assert "splade_train_grad_norm" in panel_exprs(dash, "grad")
    sparsity = panel_exprs(dash, "sparsity")
    assert "splade_train_query_nnz" in sparsity and "splade_train_doc_nnz" in sparsity
    assert "by (error_category" in panel_exprs(dash, "errors")
    memory = panel_exprs(dash, "memory")
    assert "process_memory_usage_bytes" in memory and "splade_gpu_memory" in memory
    assert re.search(r"histogram_quantile\(0\.\d+, .*splade_train_step_duration_seconds_bucket",
                     panel_exprs(dash, "step time"))
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    for p in panels(dash):
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] in datasource_uids()


def test_loss_panel_links_to_the_runs_trace(dashboards, compose):
    (dash,) = [d for d in dashboards if d["uid"] == "splade-obs-training"]
    (loss,) = [p for p in panels(dash) if p["title"] == "Loss"]
    links = loss["fieldConfig"]["defaults"]["links"]
    internal = [link["internal"] for link in links if link.get("internal")]
    assert internal and internal[0]["datasourceUid"] == "jaeger" and internal[0]["datasourceUid"] in datasource_uids()
    assert internal[0]["query"]["tags"] == "mlflow.run_id=${__field.labels.mlflow_run_id}"
    external = [link["url"] for link in links if link.get("url")]
    assert external
    url = urlsplit(external[0])
    jaeger_ui = {hp for port in compose["services"]["jaeger"]["ports"] for hp in [str(port).split(":")[1]]}
    assert url.hostname == "127.0.0.1" and str(url.port) in jaeger_ui
    assert json.loads(unquote(parse_qs(url.query)["tags"][0])) == {"mlflow.run_id": "${__field.labels.mlflow_run_id}"}
    # the span attribute the links search for is the one the trainer's root span carries
    sink = (ROOT / "splade_obs" / "sinks" / "otel" / "sink.py").read_text(encoding="utf-8")
    assert '"mlflow.run_id": e.run_id' in sink
    service = {v["name"]: v for v in dash["templating"]["list"]}["service"]
    trainer_service = compose["services"]["trainer"]["environment"]["OTEL_SERVICE_NAME"]
    assert service["current"]["value"] == trainer_service and trainer_service in service["query"].split(",")


def test_alerts_panel_charts_the_alert_counter_by_category(dashboards):
    (dash,) = [d for d in dashboards if d["uid"] == "splade-obs-training"]
    assert "sum by (alert_category, splade_run_name) (splade_alerts_total" in panel_exprs(dash, "alerts")


# ------------------------------------------------------------------------------ compose and provisioning
def test_prometheus_and_grafana_services(compose):
    services = compose["services"]
    for name, port in (("prometheus", "9090"), ("grafana", "3000")):
        svc = services[name]
        assert svc.get("profiles") is None, f"{name} should start with a plain `up`"
        assert [str(p) for p in svc["ports"]] == [f"127.0.0.1:{port}:{port}"]
        assert port in " ".join(svc["healthcheck"]["test"])
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "jaeger" in services["grafana"]["depends_on"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in services["prometheus"]["volumes"] if m.startswith("./")}
    assert mounts == {"./prometheus/prometheus.yml": "/etc/prometheus/prometheus.yml"}
    assert f"--config.file={mounts['./prometheus/prometheus.yml']}" in services["prometheus"]["command"]
    gmounts = {m.split(":")[0]: m.split(":")[1] for m in services["grafana"]["volumes"] if m.startswith("./")}
    assert gmounts == {"./grafana/provisioning": "/etc/grafana/provisioning",
                       "./grafana/dashboards": "/var/lib/grafana/dashboards"}
    for host_path in list(mounts) + list(gmounts):
        assert (DOCKER / host_path).exists(), host_path
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (GRAFANA / "dashboards" / Path(home).name).exists()
    for key in ("GF_SECURITY_ADMIN_USER", "GF_SECURITY_ADMIN_PASSWORD"):
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", services["grafana"]["environment"][key]), key


def test_collector_has_a_metrics_pipeline_to_prometheus(compose):
    cfg = load_yaml(COLLECTOR)
    metrics = cfg["service"]["pipelines"]["metrics"]
    assert "otlp" in metrics["receivers"] and "prometheus" in metrics["exporters"]
    exporter = cfg["exporters"]["prometheus"]
    assert exporter["resource_to_telemetry_conversion"]["enabled"] is True  # mlflow_run_id label
    port = exporter["endpoint"].rsplit(":", 1)[1]
    targets = {t for job in load_yaml(PROMETHEUS)["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    assert f"otel-collector:{port}" in targets
    published = " ".join(str(p) for p in compose["services"]["otel-collector"]["ports"])
    assert f":{port}" not in published, "the collector's scrape endpoint stays inside the compose network"


def test_prometheus_relabelling_maps_collector_names_to_the_trainers(emitted):
    """The collector's OTLP->Prometheus names add `_ratio` to unit-"1" gauges and a second `_per_second` to
    unit-"1/s" gauges already named so; the relabel rules map those back to the trainer's own names."""
    from splade_obs.sinks.otel.metrics import instrument_unit

    jobs = {j["job_name"]: j for j in load_yaml(PROMETHEUS)["scrape_configs"]}
    rules = jobs["otel-collector"]["metric_relabel_configs"]

    def relabel(name: str) -> str:
        for rule in rules:
            m = re.fullmatch(rule["regex"], name)
            if m and rule["target_label"] == "__name__":
                name = m.expand(rule["replacement"].replace("$1", r"\1"))
        return name

    assert instrument_unit("train/loss") == "1" and instrument_unit("train/samples_per_second") == "1/s"
    assert relabel("splade_train_loss_ratio") == "splade_train_loss"
    assert relabel("splade_train_samples_per_second_per_second") == "splade_train_samples_per_second"
    for name in emitted:  # names that are already the trainer's stay as they are
        assert relabel(name) == name, name


def datasource_uids() -> set[str]:
    return {d["uid"] for d in load_yaml(GRAFANA / "provisioning" / "datasources" / "datasources.yaml")["datasources"]}


def test_grafana_provisioning_parses(compose):
    sources = {d["type"]: d for d in
               load_yaml(GRAFANA / "provisioning" / "datasources" / "datasources.yaml")["datasources"]}
    assert set(sources) == {"prometheus", "jaeger"}  # the compose file's trace backend is Jaeger
    assert "jaeger" in compose["services"]
    for kind, service in (("prometheus", "prometheus"), ("jaeger", "jaeger")):
        url = urlsplit(sources[kind]["url"])
        assert url.hostname == service and service in compose["services"]
        container_ports = {str(p).rsplit(":", 1)[1] for p in compose["services"][service]["ports"]}
        assert str(url.port) in container_ports
    assert sum(bool(d.get("isDefault")) for d in sources.values()) == 1
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yaml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
