"""``splade-obs runs list`` / ``compare`` / ``sync``: tables of tracked runs from any MLflow store, and the replay of
points a tracking outage left in a log folder.

A run is named by its full 32-character id or by any unique prefix of at least :data:`MIN_PREFIX_LEN`
characters (``runs list`` prints the first :data:`SHORT_ID_LEN`); :func:`resolve_run_id` turns either into the
full id, or raises a :class:`~splade_obs.errors.ConfigError` (unknown, ambiguous or too short).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, Sequence

import click

from .common import handle_errors
from splade_obs.errors import ConfigError, ErrorCategory, FileSystemError

#: Fewest characters of a run id accepted as a prefix (a full id is always accepted).
MIN_PREFIX_LEN = 4
#: Characters of a run id that ``runs list`` and ``runs compare`` print (more when two listed runs share them).
SHORT_ID_LEN = 8
#: Length of a full MLflow run id (``uuid4().hex``).
FULL_ID_LEN = 32
#: Candidates an ambiguous-prefix error lists (the count says how many there are in all).
MAX_CANDIDATES_SHOWN = 10
#: Page size of the experiment and run searches, and most experiments per run search.
PAGE_SIZE = 1000
EXPERIMENTS_PER_SEARCH = 100
#: Metric prefixes shown by ``compare`` (their latest value, which is the final one; ``final/`` is kept for
#: runs tracked before those metrics were dropped).
KEY_METRIC_PREFIXES = ("epoch/", "val/", "eval/", "errors/", "train/loss", "train/skipped_batches", "run/",
                       "final/")
_HEX = re.compile(r"[0-9a-f]+")
_NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}

tracking_uri_option = click.option(
    "--tracking-uri", default=None, metavar="URI",
    help="MLflow store: http(s)://host:port, sqlite:///path.db... "
         "[default: $MLFLOW_TRACKING_URI or sqlite:///./mlruns/mlflow.db]")


def _client(tracking_uri: str | None) -> Any:
    from mlflow import MlflowClient

    from splade_obs.sinks.mlflow import store

    uri = tracking_uri or _default_uri()
    if uri.startswith("sqlite:///"):  # reading: a mistyped path must not create an empty store there
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if not db.exists():
            raise FileSystemError("no MLflow store here", file_path=str(db),
                                  hint="check --tracking-uri / MLFLOW_TRACKING_URI (runs are tracked where "
                                       "`splade-obs train` printed its MLflow UI command)")
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


def _shown_uri(uri: str) -> str:
    from splade_obs.sinks.mlflow.store import strip_credentials
    return strip_credentials(uri)


def short_ids(run_ids: Sequence[str], length: int = SHORT_ID_LEN) -> list[str]:
    """The first ``length`` characters of each id, more when two different ids would print the same."""
    while length < FULL_ID_LEN and len({r[:length] for r in set(run_ids)}) < len(set(run_ids)):
        length += 1
    return [r[:length] for r in run_ids]


def _not_found(ref: str, uri: str) -> ConfigError:
    return ConfigError(
        f"run {ref!r} not found at {_shown_uri(uri)}: no run id is or starts with it", run_ref=ref,
        hint=f"`splade-obs runs list` prints the run ids (with the same --tracking-uri); a unique prefix of "
             f"{MIN_PREFIX_LEN} or more characters is enough")


def _experiment_ids(client: Any) -> list[str]:
    """Ids of every active experiment at the tracking URI, page by page."""
    ids: list[str] = []
    token = None
    while True:
        page = client.search_experiments(max_results=PAGE_SIZE, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def _runs_with_prefix(client: Any, prefix: str) -> list[Any]:
    """Active runs of every active experiment whose id starts with ``prefix`` (lowercase hex), page by page."""
    exp_ids = _experiment_ids(client)
    found: list[Any] = []
    for i in range(0, len(exp_ids), EXPERIMENTS_PER_SEARCH):  # a bounded IN list per request
        token = None
        while True:
            page = client.search_runs(exp_ids[i:i + EXPERIMENTS_PER_SEARCH], page_token=token,
                                      filter_string=f"attributes.run_id LIKE '{prefix}%'", max_results=PAGE_SIZE)
            found += list(page)
            token = page.token
            if not token:
                break
    return found


def resolve_run_id(client: Any, ref: str, uri: str, min_length: int | None = None) -> str:
    """The full id of the run ``ref`` names: a full run id, or a unique prefix of at least ``min_length``
    characters (default :data:`MIN_PREFIX_LEN`) of an active run in any active experiment at ``uri``.

    Raises :class:`ConfigError` (exit code of CONFIG_ERROR) when no run matches, when the prefix is too short, or
    when several runs match (their ids, names and experiments are listed under the message); other store
    failures propagate as they are.
    """
    from mlflow.exceptions import MlflowException

    min_length = MIN_PREFIX_LEN if min_length is None else min_length
    ref = ref.strip()
    if len(ref) >= FULL_ID_LEN:
        try:
            return client.get_run(ref).info.run_id
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND_CODES:
                raise _not_found(ref, uri) from exc
            raise
    if len(ref) < min_length:
        raise ConfigError(
            f"run id prefix {ref!r} is too short: give at least {min_length} characters of the id", run_ref=ref,
            hint="`splade-obs runs list` prints the run ids (with the same --tracking-uri)")
    prefix = ref.lower()
    matches = _runs_with_prefix(client, prefix) if _HEX.fullmatch(prefix) else []
    if not matches:
        raise _not_found(ref, uri)
    if len(matches) > 1:
        names = {}
        lines = [f"run id prefix {ref!r} is ambiguous at {_shown_uri(uri)}: {len(matches)} runs start with it"]
        for r in sorted(matches, key=lambda r: r.info.run_id)[:MAX_CANDIDATES_SHOWN]:
            exp_id = r.info.experiment_id
            if exp_id not in names:
                names[exp_id] = getattr(client.get_experiment(exp_id), "name", exp_id)
            lines.append(f"{r.info.run_id}  {r.info.run_name or '-'}  (experiment {names[exp_id]!r})")
        if len(matches) > MAX_CANDIDATES_SHOWN:
            lines.append(f"... and {len(matches) - MAX_CANDIDATES_SHOWN} more")
        raise ConfigError("\n".join(lines), run_ref=ref, candidates=len(matches),
                          hint="give more characters of the run id")
    return matches[0].info.run_id


@click.group("runs")
def runs() -> None:
    """List and compare tracked training runs (any MLflow tracking URI); sync what an outage left unsent.

    Runs are named by their id or by a unique prefix of it (at least 4 characters), as `runs list` prints them.
    """


@runs.command("list")
@tracking_uri_option
@click.option("--experiment-name", default="splade-obs", show_default=True, help="Experiment to list.")
@click.option("--max-results", default=20, show_default=True, type=click.IntRange(1, 10_000),
              help="Most recent runs to show.")
@click.option("--full-ids", is_flag=True, default=False,
              help="Print whole 32-character run ids instead of their first 8 characters.")
@handle_errors(ErrorCategory.DEPENDENCY_ERROR)
def list_runs(tracking_uri: str | None, experiment_name: str, max_results: int, full_ids: bool) -> None:
    """Newest runs first: id, name, status, start, duration, final loss, nDCG@10 and MRR@10, errors.

    The run_id column holds the first 8 characters of each id (more if two listed runs share them), which
    `runs compare` accepts as they are; --full-ids prints whole ids.
    """
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        click.echo(f"no experiment named {experiment_name!r} at this tracking URI")
        return
    found = client.search_runs([exp.experiment_id], max_results=max_results, order_by=["attributes.start_time DESC"])
    ids = [r.info.run_id for r in found]
    shown = ids if full_ids else short_ids(ids)
    rows = []
    for r, rid in zip(found, shown):
        m = r.data.metrics
        errors = sum(int(v) for k, v in m.items() if k.startswith("errors/"))
        loss = m.get("epoch/loss", m.get("final/train_loss", m.get("train/loss")))  # final/*: runs tracked before
        rows.append([rid, r.info.run_name or "-", r.info.status, _when(r.info.start_time), _duration(r),
                     loss, m.get("eval/ndcg_at_10"), m.get("eval/mrr_at_10"), errors])
    click.echo(_table(["run_id", "name", "status", "started", "duration", "loss", "ndcg@10", "mrr@10", "errors"],
                      rows))


@runs.command("compare")
@click.argument("run_ids", nargs=-1, required=True)
@tracking_uri_option
@click.option("--all-params", is_flag=True, default=False,
              help="Also show the params that are equal in every run (those that differ are always shown).")
@handle_errors(ErrorCategory.DEPENDENCY_ERROR)
def compare(run_ids: tuple[str, ...], tracking_uri: str | None, all_params: bool) -> None:
    """Params and final metrics of RUN_IDS side by side.

    RUN_IDS are full run ids or unique prefixes of at least 4 characters (as `runs list` prints them), from
    any experiment of the store. Every param whose value differs between the runs is shown, marked * (a param
    a run lacks shows "-" and counts as differing): the config, fault injection (recovery.inject_faults), eval.*
    settings, data digests... Params equal in every run are hidden unless --all-params (a single run shows
    all). Metric rows marked * differ too.
    """
    uri = tracking_uri or _default_uri()
    client = _client(uri)
    found = [client.get_run(resolve_run_id(client, rid, uri)) for rid in run_ids]
    header = ["", *[f"{r.info.run_name or '-'} ({sid})"
                    for r, sid in zip(found, short_ids([r.info.run_id for r in found]))]]
    rows: list[list[Any]] = [["status", *[r.info.status for r in found]],
                             ["duration", *[_duration(r) for r in found]]]
    param_rows, hidden = _param_rows(found, all_params or len(found) == 1)
    rows += param_rows
    metrics = sorted({k for r in found for k in r.data.metrics if k.startswith(KEY_METRIC_PREFIXES)})
    rows += [_row(k, [r.data.metrics.get(k) for r in found]) for k in metrics]
    click.echo(_table(header, rows))
    if len(found) == 1:
        return
    differ = sum(1 for r in param_rows if r[0].startswith("*"))
    note = "1 param differs" if differ == 1 else f"{differ} params differ"
    if hidden:
        note += f"; {hidden} equal in every run not shown (--all-params shows them)"
    click.echo(note)


def _param_rows(found: Sequence[Any], show_equal: bool) -> tuple[list[list[Any]], int]:
    """One row per param of any run, sorted by key: the differing ones (marked *; absent counts as differing),
    and the equal ones when ``show_equal``. Also returns how many equal params were left out."""
    rows, hidden = [], 0
    for key in sorted({k for r in found for k in r.data.params}):
        values = [r.data.params.get(key) for r in found]
        differs = len(set(values)) > 1
        if differs or show_equal:
            rows.append([("* " if differs else "  ") + key, *values])
        else:
            hidden += 1
    return rows, hidden


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
