"""``splade-obs runs list`` / ``compare`` / ``sync``: tables of tracked runs from any MLflow store, and the replay of
points a tracking outage left in a log folder."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Sequence

import click

from .common import handle_errors
from splade_obs.errors import ErrorCategory, FileSystemError

#: Params shown by ``compare`` (first), in this order; the rest follow only with --all-params.
KEY_PARAMS = ("model.name", "data.train_file", "data.train_digest", "optim.learning_rate", "optim.batch_size",
              "optim.gradient_accumulation_steps", "optim.epochs", "optim.max_steps", "optim.mixed_precision",
              "optim.seed", "loss.lambda_q", "loss.lambda_d", "loss.distillation", "model.max_query_length",
              "model.max_doc_length")
#: Metric prefixes shown by ``compare`` (their latest value, which is the final one; ``final/`` is kept for
#: runs tracked before those metrics were dropped).
KEY_METRIC_PREFIXES = ("epoch/", "val/", "eval/", "errors/", "train/loss", "train/skipped_batches", "run/",
                       "final/")

tracking_uri_option = click.option(
    "--tracking-uri", default=None, metavar="URI",
    help="MLflow store: http(s)://host:port, sqlite:///path.db... "
         "[default: $MLFLOW_TRACKING_URI or sqlite:///./mlruns/mlflow.db]")


def _client(tracking_uri: str | None) -> Any:
    from mlflow import MlflowClient

    from splade_obs.sinks.mlflow import store

    uri = tracking_uri or _default_uri()
    store.lower_http_retries_for(uri)
    store.check_store(uri)  # a sqlite store: created, migrated or repaired under its lock, or a precise error
    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as exc:  # noqa: BLE001 - one line naming the store instead of MLflow's traceback
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise store.TrackingUnavailableError(
            f"cannot open the MLflow store {store.strip_credentials(uri)}: {first}", original_exception=exc,
            hint="check --tracking-uri / MLFLOW_TRACKING_URI and that the store answers") from exc


def _default_uri() -> str:
    """Like ``default_tracking_uri`` but never creates ``./mlruns`` just to list nothing."""
    import os
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path.cwd() / "mlruns" / "mlflow.db"
    if not db.exists():
        raise FileSystemError("no MLflow store here", file_path=str(db),
                              hint="run `splade-obs train` first, or pass --tracking-uri / set MLFLOW_TRACKING_URI")
    return f"sqlite:///{db.resolve()}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 40 else "…" + text[-39:]


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def _duration(run: Any) -> str:
    if not run.info.end_time or not run.info.start_time:
        return "-"
    return f"{(run.info.end_time - run.info.start_time) / 1000:.1f}s"


@click.group("runs")
def runs() -> None:
    """List and compare tracked training runs (any MLflow tracking URI); sync what an outage left unsent."""


@runs.command("list")
@tracking_uri_option
@click.option("--experiment-name", default="splade-obs", show_default=True, help="Experiment to list.")
@click.option("--max-results", default=20, show_default=True, type=click.IntRange(1, 10_000),
              help="Most recent runs to show.")
@handle_errors(ErrorCategory.DEPENDENCY_ERROR)
def list_runs(tracking_uri: str | None, experiment_name: str, max_results: int) -> None:
    """Newest runs first: id, name, status, start, duration, final loss and nDCG@10, errors."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        click.echo(f"no experiment named {experiment_name!r} at this tracking URI")
        return
    found = client.search_runs([exp.experiment_id], max_results=max_results, order_by=["attributes.start_time DESC"])
    rows = []
    for r in found:
        m = r.data.metrics
        errors = sum(int(v) for k, v in m.items() if k.startswith("errors/"))
        loss = m.get("epoch/loss", m.get("final/train_loss", m.get("train/loss")))  # final/*: runs tracked before
        rows.append([r.info.run_id, r.info.run_name or "-", r.info.status, _when(r.info.start_time), _duration(r),
                     loss, m.get("eval/ndcg_at_10"), errors])
    click.echo(_table(["run_id", "name", "status", "started", "duration", "loss", "ndcg@10", "errors"], rows))


@runs.command("compare")
@click.argument("run_ids", nargs=-1, required=True)
@tracking_uri_option
@click.option("--all-params", is_flag=True, default=False, help="Show every param, not only the key ones.")
@handle_errors(ErrorCategory.DEPENDENCY_ERROR)
def compare(run_ids: tuple[str, ...], tracking_uri: str | None, all_params: bool) -> None:
    """Key params and final metrics of RUN_IDS side by side (rows marked * differ between runs)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    found = []
    for rid in run_ids:
        try:
            found.append(client.get_run(rid))
        except MlflowException as exc:
            raise FileSystemError(f"run {rid} not found at this tracking URI", original_exception=exc,
                                  hint="list runs with `splade-obs runs list --tracking-uri ...`") from exc
    header = ["", *[f"{r.info.run_name or '-'} ({r.info.run_id[:8]})" for r in found]]
    rows: list[list[Any]] = [["status", *[r.info.status for r in found]],
                             ["duration", *[_duration(r) for r in found]]]
    params = list(KEY_PARAMS)
    if all_params:
        params += sorted({k for r in found for k in r.data.params} - set(KEY_PARAMS))
    rows += [_row(k, [r.data.params.get(k) for r in found]) for k in params
             if any(k in r.data.params for r in found)]
    metrics = sorted({k for r in found for k in r.data.metrics if k.startswith(KEY_METRIC_PREFIXES)})
    rows += [_row(k, [r.data.metrics.get(k) for r in found]) for k in metrics]
    click.echo(_table(header, rows))


def _row(key: str, values: list[Any]) -> list[Any]:
    differs = len({_fmt(v) for v in values}) > 1
    return [("* " if differs else "  ") + key, *values]


@runs.command("sync")
@click.argument("log_dir", metavar="LOG_DIR", type=click.Path(path_type=Path))
@click.option("--tracking-uri", default=None, metavar="URI",
              help="MLflow store to send to [default: the one recorded in the file]; credentials come from "
                   "MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, never from the file.")
@click.option("--dry-run", is_flag=True, default=False,
              help="Only count: read the file and the run, send nothing, set no status, keep the file.")
@handle_errors(ErrorCategory.DEPENDENCY_ERROR)
def sync(log_dir: Path, tracking_uri: str | None, dry_run: bool) -> None:
    """Replay LOG_DIR/mlflow_unsent.jsonl (points MLflow could not take during a run) into its run.

    Only points the run does not hold yet are sent, with their original steps and timestamps, so syncing
    twice adds nothing. A run left RUNNING gets its final status and end time. The file is then renamed
    mlflow_unsent.synced-<time>.jsonl. One line per run: points sent, points already present, status.
    """
    from splade_obs.sinks.mlflow.sync import sync_unsent

    report = sync_unsent(log_dir, tracking_uri=tracking_uri, dry_run=dry_run)
    for line in report.lines():
        click.echo(line)
