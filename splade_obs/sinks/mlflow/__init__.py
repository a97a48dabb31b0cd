"""The MLflow sink, in pieces: ``sink`` (events -> calls), ``transport`` (the client calls, the metric buffer,
the end of the run), ``sender`` (its sender and write-ahead threads), ``failures`` (transient or refused,
the circuit breaker, what the console is told), ``unsent`` (the unsent-points file), ``artifacts`` (files,
the HF model, dataset inputs), ``logged_model`` (the final and best models as LoggedModels, registration),
``model_code`` (the self-contained model MLflow loads), ``pyfunc`` (legacy loader of older runs' models),
``note`` (the run description), ``system_metrics`` (the System metrics tab), ``env``
(MLflow's environment variables -> options), ``ui`` (links into the MLflow UI), ``store``, ``sqlite_store``
(where the store is and whether it answers), ``sync`` (``runs sync``).

Importing this package does not import mlflow.
"""

from __future__ import annotations

from .sink import MlflowOptions, MlflowSink
from .store import TrackingUnavailableError, default_tracking_uri, generate_run_name, strip_credentials
from .transport import UNSENT_FILE

__all__ = ["MlflowOptions", "MlflowSink", "TrackingUnavailableError", "UNSENT_FILE", "default_tracking_uri",
           "generate_run_name", "strip_credentials"]
