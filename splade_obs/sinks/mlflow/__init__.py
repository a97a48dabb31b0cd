"""The MLflow sink, in pieces: ``sink`` (events -> calls), ``transport`` (the client calls, the metric buffer,
the end of the run), ``sender`` (its sender and write-ahead threads), ``failures`` (transient or refused,
the circuit breaker, what the console is told), ``unsent`` (the unsent-points file), ``artifacts`` (files,
model, registry, note), ``store`` (where the store is and whether it answers), ``pyfunc`` (the model wrapper
``mlflow.pyfunc.load_model`` rebuilds).

Importing this package does not import mlflow.
"""

from __future__ import annotations

from .sink import MlflowOptions, MlflowSink
from .store import TrackingUnavailableError, default_tracking_uri, generate_run_name, strip_credentials
from .transport import UNSENT_FILE

__all__ = ["MlflowOptions", "MlflowSink", "TrackingUnavailableError", "UNSENT_FILE", "default_tracking_uri",
           "generate_run_name", "strip_credentials"]
