"""The environment variables a trainer process reads, in one place.

Why a module: the compose file (docker/compose.yaml), docker/README.md and the redaction rules must all
agree on these names. tests/test_docker.py compares the trainer service's environment against
``TRAINER_ENV_VARS`` and checks that every name in ``SECRET_ENV_VARS`` is caught by
``splade_obs.redaction.is_secret_key`` so it never reaches logs, params or tags.

Almost all of them are read by the standard tools, not by splade-obs: MLflow reads the ``MLFLOW_*``
names, boto3 (used by MLflow for s3:// artifacts) the ``AWS_*`` ones and the OpenTelemetry SDK the
``OTEL_*`` ones. splade-obs itself reads ``SPLADE_OBS_CACHE``, and
``MLFLOW_TAGS`` / ``MLFLOW_RUN_NAME`` (conventions of other MLflow integrations that MLflow's client does not read).
"""

from __future__ import annotations

# Read by the MLflow client.
TRACKING_ENV_VARS: tuple[str, ...] = (
    "MLFLOW_TRACKING_URI",          # http://127.0.0.1:5000 for the compose stack
    "MLFLOW_TRACKING_USERNAME",     # basic auth (mlflow server --app-name basic-auth, or a proxy)
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",        # bearer token, instead of username/password
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",                # continue that run
    "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING",
    "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
    "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING",
    "MLFLOW_SYSTEM_METRICS_NODE_ID",
    "MLFLOW_DISABLE_TELEMETRY",
)

# Read by MLflow/boto3 only when the client writes artifacts straight to S3/MinIO
# (a server started with --no-serve-artifacts). The compose stack proxies artifacts
# through the tracking server, so the trainer needs none of these there.
ARTIFACT_STORE_ENV_VARS: tuple[str, ...] = (
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)

# Read by the OpenTelemetry SDK's OTLP exporters and resource detection.
TRACING_ENV_VARS: tuple[str, ...] = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",  # http://127.0.0.1:4318 for the compose stack
    "OTEL_EXPORTER_OTLP_HEADERS",   # e.g. "authorization=Bearer ..." for a hosted backend
    "OTEL_EXPORTER_OTLP_PROTOCOL",  # http/protobuf (port 4318) or grpc (port 4317)
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
)

# Read by splade-obs itself.
OWN_ENV_VARS: tuple[str, ...] = (
    "SPLADE_OBS_CACHE",             # model cache folder (default ~/.cache/splade-obs)
    "SPLADE_OBS_HEAD_PASS",         # CPU encoding's vocabulary pass: fp32, bf16 or int8 (default: measured)
    "MLFLOW_TAGS",                  # JSON object of extra run tags (the Hugging Face MLflow callback's convention)
    "MLFLOW_RUN_NAME",              # run name when --run-name is not given
)

TRAINER_ENV_VARS: tuple[str, ...] = (
    TRACKING_ENV_VARS + ARTIFACT_STORE_ENV_VARS + TRACING_ENV_VARS + OWN_ENV_VARS
)

# Values that must never be logged, recorded as params/tags or written to artifacts.
SECRET_ENV_VARS: tuple[str, ...] = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "OTEL_EXPORTER_OTLP_HEADERS",
)

