"""The MLflow sink, in pieces: ``sink`` (events -> calls), ``transport`` (bounded client calls, the metric
buffer, the unsent-points file), ``artifacts`` (files, model, registry, note), ``store`` (where the store
is and whether it answers), ``pyfunc`` (the model wrapper ``mlflow.pyfunc.load_model`` rebuilds).

Importing this package does not import mlflow.
"""

from __future__ import annotations

from .sink import MlflowOptions, MlflowSink
from .store import TrackingUnavailableError, default_tracking_uri, generate_run_name, strip_credentials
from .transport import UNSENT_FILE

__all__ = ["MlflowOptions", "MlflowSink", "TrackingUnavailableError", "UNSENT_FILE", "default_tracking_uri",
           "generate_run_name", "strip_credentials"]
