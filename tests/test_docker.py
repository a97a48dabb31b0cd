"""Static checks of docker/ (compose stack, Dockerfile, collector config) against what the trainer reads.

No Docker engine runs here, so the files are parsed and cross-checked: services, ports bound to
127.0.0.1, health checks, start order, env names against splade_obs.envvars, secrets only as ${...}
references, Dockerfile layer order and user. Where a compose client exists (`docker compose` plugin or
the standalone `docker-compose`), it validates the file too. One test starts a real `mlflow server`
with the compose file's allowed-hosts setting to prove the trainer container's Host header passes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from splade_obs import envvars
from splade_obs.redaction import is_secret_key

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"
COLLECTOR = DOCKER / "otel-collector.yaml"

BACKEND_SERVICES = {"postgres", "minio", "minio-init", "mlflow", "otel-collector", "jaeger"}
ONE_SHOT = {"minio-init"}
# Services without an in-container health check, and why (the test fails if a new one appears).
NO_HEALTHCHECK = {
    "minio-init": "one-shot job; mlflow waits for service_completed_successfully",
    "trainer": "batch job; its exit code is the health signal",
    "otel-collector": "image is FROM scratch (no shell/curl/wget); health_check extension published on 13133",
}
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
PURE_REF_RE = re.compile(r"^(\$\{[^}]+\})+$")


# ----------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a dotenv file (comments and blanks skipped)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        out[key.strip()] = value.strip().strip("'\"")
    return out


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def published_ports(service: dict) -> list[tuple[str | None, str, str]]:
    """(host_ip, host_port, container_port) for each entry of ``ports`` (short or long syntax)."""
    out = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.append((p.get("host_ip"), str(p.get("published", "")), str(p["target"])))
            continue
        parts = str(p).split("/")[0].split(":")
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2]))
        elif len(parts) == 2:
            out.append((None, parts[0], parts[1]))
        else:
            out.append((None, "", parts[0]))
    return out


def strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in strings(k) + strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings(v)]
    return []


def interpolations(text: str) -> list[tuple[str, str, str]]:
    """(name, operator, default/message) for every ${...} in ``text`` ($$ escapes excluded)."""
    return [(m.group(1), m.group(2) or "", m.group(3) or "") for m in VAR_RE.finditer(text.replace("$$", ""))]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and backslash continuations joined."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_stages(instructions: list[tuple[str, str]]) -> list[dict]:
    stages: list[dict] = []
    for ins, args in instructions:
        if ins == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            stages.append({"base": m.group(1), "name": m.group(2), "ins": []})
        elif stages:
            stages[-1]["ins"].append((ins, args))
    return stages


def assignments(args: str) -> dict[str, str | None]:
    """KEY=VALUE pairs of an ENV/ARG line (legacy ``ENV KEY VALUE`` too); None when no value."""
    tokens = shlex.split(args)
    if len(tokens) >= 2 and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return {k: (v if sep else None) for k, sep, v in (t.partition("=") for t in tokens)}


def is_secret_name(name: str) -> bool:
    return is_secret_key(name) or name.upper() in {"AWS_ACCESS_KEY_ID"}


# ------------------------------------------------------------------------------------ compose.yaml
def test_required_services_present(compose):
    services = set(compose["services"])
    assert BACKEND_SERVICES | {"trainer"} <= services, f"missing: {BACKEND_SERVICES | {'trainer'} - services}"


def test_plain_up_starts_backend_only(compose):
    """`docker compose up` must not start a training run: only the trainer sits behind a profile."""
    services = compose["services"]
    assert services["trainer"].get("profiles") == ["train"]
    for name in BACKEND_SERVICES:
        assert not services[name].get("profiles"), f"{name} must start with a plain `up`"


def test_every_published_port_is_bound_to_loopback(compose):
    seen = 0
    for name, svc in compose["services"].items():
        for host_ip, host_port, container_port in published_ports(svc):
            seen += 1
            assert host_ip == "127.0.0.1", f"{name}: port {container_port} published on {host_ip or 'all interfaces'}"
            assert host_port, f"{name}: port {container_port} gets a random host port"
        assert "expose" not in svc or not svc.get("network_mode") == "host", name
        assert svc.get("network_mode") != "host", f"{name} uses host networking (bypasses port binding)"
    assert seen >= 5  # mlflow, minio x2, jaeger UI, collector x3


def test_laptop_endpoints_are_published(compose):
    """A laptop run points at http://127.0.0.1:5000 and http://127.0.0.1:4318 (and the UI on 16686)."""
    services = compose["services"]
    def host_ports(svc):
        return {(hp, cp) for _, hp, cp in published_ports(services[svc])}
    assert ("5000", "5000") in host_ports("mlflow")
    assert {("4317", "4317"), ("4318", "4318")} <= host_ports("otel-collector")
    assert ("16686", "16686") in host_ports("jaeger")


def test_long_running_services_have_healthchecks(compose):
    for name, svc in compose["services"].items():
        if name in NO_HEALTHCHECK:
            assert "healthcheck" not in svc or svc["healthcheck"].get("disable"), name
            continue
        hc = svc.get("healthcheck")
        assert hc and hc.get("test"), f"{name} has no healthcheck"
        assert not hc.get("disable"), name
        test = hc["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), f"{name}: {test!r}"
        assert hc.get("interval") and hc.get("retries"), f"{name}: healthcheck needs interval and retries"
    assert set(NO_HEALTHCHECK) <= set(compose["services"]), "stale NO_HEALTHCHECK entry"


def test_depends_on_waits_for_health(compose):
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on must use the long form with conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            cond = spec.get("condition")
            if dep in ONE_SHOT:
                assert cond == "service_completed_successfully", f"{name} -> {dep}: {cond}"
            elif "healthcheck" in services[dep]:
                assert cond == "service_healthy", f"{name} -> {dep}: {cond}"
            else:
                assert dep in NO_HEALTHCHECK and cond == "service_started", f"{name} -> {dep}: {cond}"
    assert set(services["mlflow"]["depends_on"]) == {"postgres", "minio-init"}
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["otel-collector"]["depends_on"]["jaeger"]["condition"] == "service_healthy"
    assert {"mlflow", "otel-collector"} <= set(services["trainer"]["depends_on"])


def test_trainer_env_names_match_what_the_trainer_reads(compose):
    env = service_env(compose["services"]["trainer"])
    unknown = set(env) - set(envvars.TRAINER_ENV_VARS)
    assert not unknown, f"trainer env names the trainer never reads: {sorted(unknown)}"
    needed = {"MLFLOW_TRACKING_URI", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
              "OTEL_SERVICE_NAME", "SPLADE_OBS_CACHE"}
    assert needed <= set(env), f"missing: {sorted(needed - set(env))}"


def test_trainer_env_points_at_the_stack(compose):
    """The URLs in the trainer's env name a compose service and a port that service listens on."""
    services = compose["services"]
    env = service_env(services["trainer"])
    tracking = urlsplit(env["MLFLOW_TRACKING_URI"])
    assert tracking.scheme == "http" and tracking.hostname == "mlflow"
    mlflow_cmd = services["mlflow"]["command"]
    assert str(tracking.port) == mlflow_cmd[mlflow_cmd.index("--port") + 1]
    otlp = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert otlp.hostname == "otel-collector"
    protocol_port = {"http/protobuf": 4318, "http/json": 4318, "grpc": 4317}[env["OTEL_EXPORTER_OTLP_PROTOCOL"]]
    assert otlp.port == protocol_port
    collector = yaml.safe_load(COLLECTOR.read_text(encoding="utf-8"))
    proto = "grpc" if protocol_port == 4317 else "http"
    assert collector["receivers"]["otlp"]["protocols"][proto]["endpoint"].endswith(f":{protocol_port}")
    cache_mounts = [v.split(":")[1] for v in services["trainer"].get("volumes", []) if isinstance(v, str)]
    assert env["SPLADE_OBS_CACHE"] in cache_mounts, "model cache should live on a volume"


def test_env_var_names_are_the_ones_the_tools_read():
    """Each MLFLOW_*/OTEL_* name is a real setting of the installed MLflow / OTel SDK (no typos)."""
    import mlflow.environment_variables as mlflow_env
    import opentelemetry.sdk.environment_variables as otel_env

    for name in envvars.TRACKING_ENV_VARS + ("MLFLOW_S3_ENDPOINT_URL",):
        assert getattr(mlflow_env, name).name == name
    for name in envvars.TRACING_ENV_VARS:
        assert getattr(otel_env, name) == name
    assert len(set(envvars.TRAINER_ENV_VARS)) == len(envvars.TRAINER_ENV_VARS)
    assert set(envvars.SECRET_ENV_VARS) <= set(envvars.TRAINER_ENV_VARS)


def test_no_literal_secrets_in_compose(compose):
    """Every secret-named value is a pure ${VAR} reference; credentials inside URLs are references too."""
    for name, svc in compose["services"].items():
        for key, value in service_env(svc).items():
            if is_secret_name(key) or key.endswith(("_USER", "_USERNAME")):
                assert PURE_REF_RE.match(value), f"{name}.{key} holds a literal value"
                for var, op, _ in interpolations(value):
                    assert op != ":-" and op != "-", f"{name}.{key}: secret ${{{var}}} must not have a default"
    for text in strings(compose):
        for m in re.finditer(r"://([^/@\s]+)@", text):
            for part in m.group(1).split(":"):
                assert PURE_REF_RE.match(part), f"credentials in URL are not ${{...}} references: {text}"
    example_secrets = {v for k, v in env_file(ENV_EXAMPLE).items() if is_secret_name(k)}
    raw = COMPOSE.read_text(encoding="utf-8")
    for value in example_secrets:
        assert value not in raw, "a value from .env.example was pasted into compose.yaml"


def test_env_example_covers_required_vars_with_placeholders(compose):
    example = env_file(ENV_EXAMPLE)
    refs = [ref for text in strings(compose) for ref in interpolations(text)]
    required = {name for name, op, _ in refs if op in (":?", "?", "")}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"} <= required
    assert required <= set(example), f".env.example lacks {sorted(required - set(example))}"
    assert set(example) <= {name for name, _, _ in refs}, "stale names in .env.example"
    secret_like = {k: v for k, v in example.items() if is_secret_name(k) or k.startswith("MINIO_ROOT")}
    assert secret_like
    for key, value in secret_like.items():
        assert value.startswith("change-me"), f"{key} in .env.example should be an obvious placeholder"


def test_real_env_file_is_not_committed_or_shipped():
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for pattern in ("**/.env", ".venv", ".git"):
        assert pattern in ignore, f".dockerignore must exclude {pattern}"
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "docker/.env"], cwd=ROOT, capture_output=True, text=True)
        assert tracked.stdout.strip() == "", "docker/.env is tracked by git"


# -------------------------------------------------------------------------------------- Dockerfile
@pytest.fixture(scope="module")
def stages() -> list[dict]:
    return dockerfile_stages(dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")))


def test_dockerfile_is_multi_stage_with_trainer_last(stages):
    names = [s["name"] for s in stages]
    assert len(stages) >= 3 and all(names), names
    assert names[-1] == "trainer", "the default build target (last stage) must be the trainer"
    copies_from = [a for s in stages[-1:] for i, a in s["ins"] if i == "COPY" and a.startswith("--from=")]
    assert copies_from, "the trainer stage should copy the built venv from an earlier stage"


def test_dockerfile_runs_as_non_root(stages):
    for stage in stages:
        kinds = [i for i, _ in stage["ins"]]
        if "ENTRYPOINT" not in kinds:
            continue
        entry = kinds.index("ENTRYPOINT")
        users = [a for i, a in stage["ins"][:entry] if i == "USER"]
        assert users, f"stage {stage['name']}: no USER before ENTRYPOINT"
        assert users[-1].split(":")[0] not in ("root", "0"), f"stage {stage['name']} runs as root"


def test_dockerfile_entrypoint_is_the_cli(stages):
    trainer = stages[-1]
    entry = [a for i, a in trainer["ins"] if i == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["splade-obs"]
    assert ("HEALTHCHECK", "NONE") in trainer["ins"], "say explicitly that a batch job has no health check"
    assert any(i == "LABEL" and "healthcheck" in a for i, a in trainer["ins"])


def test_dockerfile_layers_put_dependencies_before_source(stages):
    flat = [(i, a) for s in stages for i, a in s["ins"]]
    def first(pred):
        return next(n for n, (i, a) in enumerate(flat) if pred(i, a))
    pyproject = first(lambda i, a: i == "COPY" and "pyproject.toml" in a)
    torch = first(lambda i, a: i == "RUN" and "pip install" in a and "torch" in a)
    deps = first(lambda i, a: i == "RUN" and "pip install -r" in a)
    source = first(lambda i, a: i == "COPY" and re.search(r"\bsplade_obs\b", a))
    assert torch < pyproject < deps < source, (torch, pyproject, deps, source)
    for i, a in flat:
        if i in ("COPY", "ADD"):
            assert not re.search(r"(^|\s)\.(\s|$)", a), f"{i} {a}: copying the whole context busts the cache"
            assert ".env" not in a


def test_dockerfile_bakes_no_secrets(stages):
    text = DOCKERFILE.read_text(encoding="utf-8")
    for stage in stages:
        for ins, args in stage["ins"]:
            if ins not in ("ENV", "ARG"):
                continue
            for key, value in assignments(args).items():
                assert not (is_secret_name(key) and value), f"{ins} {key} carries a value in the image"
    assert not re.search(r"(?i)--mount=type=secret.*\bENV\b", text)
    assert "TORCH_VARIANT" in text and "download.pytorch.org/whl/${TORCH_VARIANT}" in text


# -------------------------------------------------------------------------------- otel-collector
def test_collector_pipelines_reference_defined_components(compose):
    cfg = yaml.safe_load(COLLECTOR.read_text(encoding="utf-8"))
    service = cfg["service"]
    for ext in service.get("extensions", []):
        assert ext in cfg["extensions"], ext
    for pipeline_name, pipeline in service["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in pipeline.get(kind, []):
                assert comp in (cfg.get(kind) or {}), f"{pipeline_name}.{kind}: {comp} is not defined"
        assert pipeline["receivers"] and pipeline["exporters"], pipeline_name
    traces = service["pipelines"]["traces"]
    assert "debug" in traces["exporters"]
    jaeger_exporters = [e for e in traces["exporters"] if e.split("/")[0] in ("otlp", "otlphttp")]
    assert jaeger_exporters
    endpoint = cfg["exporters"][jaeger_exporters[0]]["endpoint"]
    host = endpoint.split("://")[-1].split(":")[0]
    assert host in compose["services"], f"collector exports to {host}, which is not a compose service"
    protocols = cfg["receivers"]["otlp"]["protocols"]
    assert {"grpc", "http"} <= set(protocols)
    health_port = cfg["extensions"]["health_check"]["endpoint"].rsplit(":", 1)[1]
    assert (health_port, health_port) in {(hp, cp) for _, hp, cp in
                                          published_ports(compose["services"]["otel-collector"])}
    mount = compose["services"]["otel-collector"]["volumes"][0]
    assert mount.split(":")[0] == "./otel-collector.yaml"


def test_collector_drops_secret_attributes():
    cfg = yaml.safe_load(COLLECTOR.read_text(encoding="utf-8"))
    actions = cfg["processors"]["attributes/drop-secrets"]["actions"]
    pattern = re.compile(actions[0]["pattern"].replace("(?i)", ""), re.IGNORECASE)
    assert actions[0]["action"] == "delete"
    for key in ("http.request.header.authorization", "db.password", "mlflow.token", "api_key"):
        assert pattern.fullmatch(key), key
    for key in ("splade.loss", "rank", "service.name"):
        assert not pattern.fullmatch(key), key


# ------------------------------------------------------------------------------ compose validation
def compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def compose_cli() -> list[str]:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no compose client: neither the `docker compose` plugin nor `docker-compose` is installed "
                    "(apt-get install docker-compose gives one that validates without an engine)")
    return cmd


def run_compose(cmd: list[str], env_file_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "MINIO_", "MLFLOW_", "COMPOSE_"))}
    return subprocess.run([*cmd, "--env-file", str(env_file_path), "-f", str(COMPOSE), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_compose_client_validates_the_file(compose_cli):
    proc = run_compose(compose_cli, ENV_EXAMPLE, "--profile", "train", "config")
    assert proc.returncode == 0, proc.stderr
    rendered = yaml.safe_load(proc.stdout)
    assert BACKEND_SERVICES | {"trainer"} <= set(rendered["services"])
    # (profile filtering of `config --services` differs between compose v1 and v2; the profile itself
    # is checked by test_plain_up_starts_backend_only)
    trainer = rendered["services"]["trainer"]
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    mlflow_env = rendered["services"]["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://mlflow:change-me-")
    for svc in rendered["services"].values():
        for port in svc.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", port


def test_compose_client_refuses_missing_credentials(compose_cli, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("", encoding="utf-8")
    proc = run_compose(compose_cli, empty, "config")
    assert proc.returncode != 0
    assert "docker/.env" in proc.stderr, proc.stderr  # the ${VAR:?message} text reaches the user


# ------------------------------------------------------------------------------------ secrets
def test_secret_env_vars_are_recognised_and_redacted():
    for name in envvars.SECRET_ENV_VARS:
        assert is_secret_key(name), f"redaction.is_secret_key misses {name}"
    from splade_obs.redaction import redact_text, secret_values
    fake = {
        "MLFLOW_TRACKING_PASSWORD": "pw-not-real-123",
        "MLFLOW_TRACKING_TOKEN": "tok-not-real-456",
        "AWS_SECRET_ACCESS_KEY": "aws-not-real-789",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer hdr-not-real-000",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
    }
    assert set(envvars.SECRET_ENV_VARS) <= set(fake)
    line = "connecting " + " ".join(f"{k}={v}" for k, v in fake.items())
    clean = redact_text(line, secret_values(fake))
    for name in envvars.SECRET_ENV_VARS:
        value = fake[name].split()[-1]
        assert value not in clean, f"{name} leaked: {clean}"
    assert "http://127.0.0.1:5000" in clean


# ------------------------------------------------------------------ real mlflow server: allowed hosts
def compose_default(value: str) -> str:
    """The value compose uses when the ${VAR:-default} is not set in .env."""
    return VAR_RE.sub(lambda m: m.group(3) or "", value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_for_host(port: int, host_header: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                                 headers={"Host": host_header})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.server
@pytest.mark.timeout(180)
def test_mlflow_server_accepts_the_trainer_containers_host_header(compose, tmp_path):
    """Without MLFLOW_SERVER_ALLOWED_HOSTS, MLflow rejects `Host: mlflow:5000` (the trainer container's
    request); with the compose value a real server accepts it and still rejects unknown hosts."""
    from mlflow.server.security_utils import get_default_allowed_hosts

    assert not any(fnmatch("mlflow:5000", h) or h == "mlflow:5000" for h in get_default_allowed_hosts())
    allowed = compose_default(service_env(compose["services"]["mlflow"])["MLFLOW_SERVER_ALLOWED_HOSTS"])
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ALLOWED_HOSTS": allowed, "MLFLOW_DISABLE_TELEMETRY": "true",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"), start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(1)
        assert status_for_host(port, "mlflow:5000") == 200
        assert status_for_host(port, "127.0.0.1:5000") == 200
        assert status_for_host(port, "evil.example:5000") in (400, 403)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_team_setup_readme_matches_the_published_ports(compose):
    """The laptop URLs the README tells users to export are the ones compose publishes."""
    text = (DOCKER / "README.md").read_text(encoding="utf-8")
    assert "## Team setup" in text
    mlflow_port = published_ports(compose["services"]["mlflow"])[0][1]
    otlp_http = {cp: hp for _, hp, cp in published_ports(compose["services"]["otel-collector"])}["4318"]
    assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in text
    assert f"OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:{otlp_http}" in text
    assert "cp docker/.env.example docker/.env" in text
