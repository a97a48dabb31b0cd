"""The unsent-points file ``<log_dir>/mlflow_unsent.jsonl``: what the tracking store did not get, on disk.

Written by the transport (write-ahead while the run goes, compacted at its end), read by
``splade-obs runs sync``. The format is described on :class:`UnsentFile` and in docs/observability.md.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("splade_obs.sinks.mlflow")

UNSENT_FILE = "mlflow_unsent.jsonl"
UNSENT_FORMAT = 2                     # header "format": 1 (no field) had no sent_lines, status or end time


class Point:
    """One metric point; ``line`` is its index among the point lines of the unsent file's section."""

    __slots__ = ("seq", "key", "value", "step", "timestamp", "line")

    def __init__(self, seq: int, key: str, value: float, step: int, timestamp: int) -> None:
        self.seq, self.key, self.value, self.step, self.timestamp = seq, key, value, step, timestamp
        self.line: int | None = None

    def json(self) -> str:
        value: Any = self.value if math.isfinite(self.value) else str(self.value)
        return json.dumps({"key": self.key, "value": value, "step": self.step, "timestamp": self.timestamp})

    def metric(self) -> Any:
        from mlflow.entities import Metric
        return Metric(self.key, self.value, self.timestamp, self.step)


class UnsentFile:
    """``mlflow_unsent.jsonl``: the points this run could not send, readable by ``splade-obs runs sync``.

    The file holds one *section* per process that wrote it (a resumed run in the same log folder appends
    its own). A section is a header line (it has ``"run_id"`` and ``"tracking_uri"``), then point lines
    ``{"key", "value", "step", "timestamp"}`` (``value`` is a number, or ``"nan"`` / ``"inf"`` / ``"-inf"``),
    and, only in a file whose process could not finish (killed), lines ``{"run_id", "sent_lines": [first,
    last]}``: the section's point lines ``first..last`` (0-based among its point lines, inclusive) reached
    the store after they were written. A process that ends compacts its section: header plus unsent points
    only. Replaying a point the store already holds is harmless (MLflow drops exact duplicates, and ``runs
    sync`` checks the run's history first), so a reader may ignore ``sent_lines`` (it is shaped like a header
    update that adds no field a reader uses). Other sections are kept byte for byte.

    Every method is called with the transport's lock held.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start: int | None = None   # byte offset of this process's section; None: not written yet
        self.lines = 0                  # point lines in the section
        self.failed = False             # a write failed (disk full...): counted as dropped, logged once
        self.run_id = ""

    def _write(self, mode: str, text: str) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, mode, encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
            return True
        except OSError as exc:
            if not self.failed:
                log.warning("MLflow sink: could not write %s: %s", self.path, exc)
            self.failed = True
            return False

    def append(self, header: dict[str, Any], points: list[Point]) -> bool:
        """Append ``points`` (opening this process's section with ``header`` first); sets their ``line``."""
        if not points:
            return True
        lines = []
        self.run_id = str(header.get("run_id") or "")
        if self.start is None:
            try:
                start = self.path.stat().st_size
            except OSError:
                start = 0
            lines.append(json.dumps(header))
        lines += [p.json() for p in points]
        if not self._write("a", "\n".join(lines) + "\n"):
            return False
        if self.start is None:
            self.start = start
        for p in points:
            p.line = self.lines
            self.lines += 1
        return True

    def mark_sent(self, lines: list[int]) -> None:
        if self.start is None or not lines:
            return
        ranges = []
        for _, group in itertools.groupby(enumerate(sorted(set(lines))), key=lambda t: t[1] - t[0]):
            idx = [n for _, n in group]
            ranges.append(json.dumps({"run_id": self.run_id, "sent_lines": [idx[0], idx[-1]]}))
        self._write("a", "\n".join(ranges) + "\n")

    def compact(self, header: dict[str, Any], live: list[Point], keep_section: bool) -> int:
        """Rewrite atomically: other sections as they are, then this section as ``header`` and its unsent
        points (those written before and not marked sent, then ``live`` points not written yet). ``live``
        points get their new line numbers. Without points and ``keep_section`` False, the section goes
        (and the file, when nothing else is in it). Returns the number of unsent points in the section."""
        from ...atomic import atomic_writer

        prefix, old = b"", []
        try:
            data = self.path.read_bytes()
        except OSError:
            data = b""
        if self.start is not None:
            prefix, section = data[:self.start], data[self.start:]
            old, sent = [], set()
            for raw in section.decode("utf-8", "replace").splitlines()[1:]:
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue  # a cut line: cannot happen in our own section, unless a write failed
                if isinstance(obj, dict) and "sent_lines" in obj and "key" not in obj:
                    first, last = obj["sent_lines"]
                    sent.update(range(int(first), int(last) + 1))
                elif isinstance(obj, dict) and "key" in obj:
                    old.append(raw)
            old = [(i, raw) for i, raw in enumerate(old) if i not in sent]
        else:
            prefix = data
        renumber = {i: n for n, (i, _) in enumerate(old)}
        fresh = [p for p in live if p.line is None]
        for p in live:
            if p.line is not None:
                p.line = renumber.get(p.line)
        texts = [raw for _, raw in old]
        for p in fresh:
            p.line = len(texts)
            texts.append(p.json())
        header = {**header, "unsent": len(texts)}
        self.run_id = str(header.get("run_id") or "")
        if not texts and not keep_section:
            try:
                if prefix:
                    with atomic_writer(self.path, "wb") as fh:
                        fh.write(prefix)
                elif self.path.exists():
                    self.path.unlink()
            except OSError as exc:
                log.warning("MLflow sink: could not rewrite %s: %s", self.path, exc)
            self.start, self.lines = None, 0
            return 0
        if prefix and not prefix.endswith(b"\n"):
            prefix += b"\n"  # a previous process cut mid-line: keep our header on a line of its own
        try:
            with atomic_writer(self.path, "wb") as fh:
                fh.write(prefix)
                fh.write(("\n".join([json.dumps(header), *texts]) + "\n").encode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - the old file stays as it was
            if not self.failed:
                log.warning("MLflow sink: could not rewrite %s: %s", self.path, exc)
            self.failed = True
            return len(texts)
        self.start, self.lines = len(prefix), len(texts)
        return len(texts)


def replay_before_resume(log_dir: str | Path | None, tracking_uri: str, run_id: str) -> int:
    """A resumed run first takes back what the interrupted process left in ``<log_dir>/mlflow_unsent.jsonl``
    (``splade-obs runs sync``, done for the user): the points of the steps up to the checkpoint it resumes from
    are not produced again. Returns the points sent; a failure is one warning (the file stays for a sync)."""
    path = Path(log_dir) / UNSENT_FILE if log_dir else None
    if path is None or not path.is_file():
        return 0
    from ...errors import ApplicationError
    from .sync import sync_unsent

    try:
        report = sync_unsent(path, tracking_uri=tracking_uri)
    except ApplicationError as err:
        log.warning("MLflow: could not replay %s into the resumed run (%s); `splade-obs runs sync %s` will",
                    path, err.message, path.parent)
        return 0
    sent = sum(r.sent for r in report.runs if r.run_id == run_id)
    log.info("MLflow: replayed %d points the interrupted run left in %s", sent, path)
    return sent
