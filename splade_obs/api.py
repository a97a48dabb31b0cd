"""The Python API: :func:`train`, :class:`SpladeEncoder`, :func:`evaluate`, :func:`encode` (see ``docs/api.md``).

``splade-obs train`` is a thin layer over :func:`train`; ``evaluate`` and ``encode`` call the same functions
these wrap (:class:`~splade_obs.evaluation.RetrievalEvaluator`, :func:`~splade_obs.encoding.encode_file`).
Importing this module is cheap: torch, transformers and MLflow load when a function first needs them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Union

from .errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover
    import scipy.sparse

    from .bus import Sink
    from .config import TrainConfig
    from .encoding import EncodeStats
    from .model import SpladeEncoder as SpladeModule
    from .run import RunResult

log = logging.getLogger("splade_obs.api")

#: What ``train(config=...)`` takes: a config, a nested or dotted mapping of keys, or a config file.
ConfigLike = Union["TrainConfig", Mapping[str, Any], str, "os.PathLike[str]", None]
#: What ``train(data=...)`` takes: a training file or BEIR folder, or records (a list of dicts, a
#: ``datasets.Dataset``, any iterable of mappings) in the training-file schema (docs/recipes.md).
DataLike = Union[str, "os.PathLike[str]", Iterable[Mapping[str, Any]], None]
#: The file in ``output_dir`` that in-memory records are written to, so that the run reads, digests and
#: records them like any training file (and ``--resume auto`` finds the same data).
RECORDS_FILE = "train_records.jsonl"
#: How the records are named in error messages: ``records[3]: field "query" is missing — ...``.
RECORDS_SOURCE = "records"
Kind = Literal["corpus", "queries"]
#: A model for :func:`evaluate` / :func:`encode`: a name or folder, a :class:`SpladeEncoder` or its module.
ModelLike = Union[str, "os.PathLike[str]", "SpladeEncoder", "SpladeModule"]


# ------------------------------------------------------------------------------------------ CPU settings
def apply_cpu_settings() -> bool:
    """The CPU thread settings every command applies: idle OpenMP threads sleep instead of spinning.

    On a machine shared with other busy processes, spinning threads made training ~10x slower (2.2 vs 23
    samples/s measured on 2 cores); on an idle machine the cost is within noise. An ``OMP_WAIT_POLICY``
    the user set is kept. OpenMP reads it when torch loads: returns False (and changes nothing) when torch
    is already imported, True when the setting is in place for it.
    """
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


# ------------------------------------------------------------------------------------------ train
def train(config: ConfigLike = None, data: DataLike = None, *, sinks: Iterable[Sink | str] = (),
          raise_on_failure: bool = True, capture_root_logger: bool = False, close_timeout: float = 120.0,
          ) -> RunResult:
    """Train a SPLADE model, with the sinks of the config (MLflow, OpenTelemetry, files, console) and ``sinks``.

    ``config``: a :class:`TrainConfig`, a mapping of keys (``{"optim": {"max_steps": 5}}`` or
    ``{"optim.max_steps": 5}``), a YAML/TOML/JSON config file, or None for the defaults.
    ``data``: a training file or BEIR folder (overrides ``data.train_file``); or records in the
    training-file schema — a list of dicts, a ``datasets.Dataset``, any iterable of mappings — checked as a
    file's records are (errors name ``records[i]``) and written to ``<output_dir>/train_records.jsonl``.
    ``sinks``: :class:`Sink` instances, or names of sinks installed under the ``splade_obs.sinks`` entry
    point group; they receive every event after the built-in sinks, with the same isolation.

    Logging goes to handlers on the ``splade_obs`` (and library) loggers, removed at the end; the root
    logger's handlers and level are left alone (``capture_root_logger=True``, what ``splade-obs train``
    does, puts them on the root logger for the run, so every library's records reach the run's files). Returns a :class:`~splade_obs.run.RunResult`
    (``model_path``, ``metrics``, ``run_id``, ``trace_id``, ``status``); a failed run raises its typed
    error (with that result as ``error.run_result``) unless ``raise_on_failure=False``.
    """
    from .plugins import resolve_sinks

    cfg = _config(config)
    if data is not None:
        cfg = cfg.replace(data={"train_file": _data_file(data, cfg)})
    extra = resolve_sinks(sinks)
    if not apply_cpu_settings() and "OMP_WAIT_POLICY" not in os.environ:
        log.debug("torch was imported before splade_obs.train: OMP_WAIT_POLICY=PASSIVE could not apply")
    from .run import run_training

    outcome = run_training(cfg, extra, close_timeout=close_timeout, capture_root_logger=capture_root_logger)
    error = outcome.result.error
    if raise_on_failure and outcome.status == "FAILED" and error is not None:
        error.run_result = outcome  # type: ignore[attr-defined] # the run ids and checkpoint of the failed run
        raise error
    return outcome


def _config(config: ConfigLike) -> TrainConfig:
    from .config import TrainConfig

    if config is None:
        return TrainConfig()
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, Mapping):
        return TrainConfig.from_mapping(config)
    if isinstance(config, (str, os.PathLike)):
        return TrainConfig.load(config)
    raise ConfigError(f"config is {type(config).__name__}; expected a TrainConfig, a mapping of config keys or a "
                      "config file path", field="config", hint="see docs/api.md")


def _data_file(data: DataLike, cfg: TrainConfig) -> str:
    """The training file for ``data``: a path as it is, records written to ``<output_dir>/train_records.jsonl``."""
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    if isinstance(data, Mapping) or isinstance(data, (bytes, bytearray)):
        raise ConfigError(f"data is {type(data).__name__}; expected a path or a sequence of records",
                          field="data", hint="pass a list of dicts, one split of a datasets.DatasetDict "
                                             "(data['train']), or a file path")
    if not isinstance(data, Iterable):
        raise ConfigError(f"data is {type(data).__name__}; expected a path or an iterable of records", field="data",
                          hint="pass a list of dicts, a datasets.Dataset or a file path")
    lines = _checked_records(data, cfg)
    path = cfg.output_dir / RECORDS_FILE
    text = "".join(lines)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:  # a resumed run keeps the same bytes
        from .atomic import atomic_writer

        with atomic_writer(path) as f:
            f.write(text)
    return str(path)


def _checked_records(rows: Iterable[Any], cfg: TrainConfig) -> list[str]:
    """One JSON line per record, after the checks a training file's records get (all of them, then one error).

    With ``data.on_bad_record=skip`` bad records are kept in the lines: the run drops them as it would a
    file's and writes them to ``bad_records.jsonl``.
    """
    from .data import _Collected, _finish
    from .records import Where, validate_record

    collected = _Collected()
    lines: list[str] = []
    for i, row in enumerate(rows):
        record = dict(row) if isinstance(row, Mapping) else row
        where = Where(RECORDS_SOURCE, index=i)
        try:
            line = json.dumps(record, ensure_ascii=False, allow_nan=False, default=_plain)
        except (TypeError, ValueError) as exc:
            raise DataError(f"record cannot be written as JSON: {exc}", file_path=RECORDS_SOURCE,
                            index=i, hint="records hold strings, lists of strings and finite numbers") from None
        example, problems = validate_record(json.loads(line), where)  # as the run will read it back
        if example is None:
            collected.add_bad(problems, line)
        else:
            collected.examples.append(example)
        lines.append(line + "\n")
    if cfg.data.on_bad_record == "error" or not lines:
        _finish(collected, RECORDS_SOURCE, "records", "error", None, cfg.data.max_reported_problems)
    return lines


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (from a Dataset or a DataFrame) as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# ------------------------------------------------------------------------------------------ encoding
class SpladeEncoder:
    """A trained SPLADE model for inference: texts in, sparse term weights out.

    ``model``: ``"splade-tiny"``, a saved model folder (``outputs/<run>/final``) or a hub id. ``module`` is
    the underlying :class:`torch.nn.Module` (:class:`splade_obs.model.SpladeEncoder`).
    """

    def __init__(self, model: str | os.PathLike[str] | SpladeModule = "splade-tiny", *, device: str = "auto",
                 max_query_length: int = 64, max_doc_length: int = 256, batch_size: int = 32) -> None:
        from .encoding import DEFAULT_MAX_LENGTH

        if isinstance(model, (str, os.PathLike)):
            from .device import device_name
            from .model import SpladeEncoder as Module

            self.module: SpladeModule = Module.from_pretrained(os.fspath(model), device=device_name(device, "device"))
        else:
            self.module = model
        self.max_length: dict[str, int] = {**DEFAULT_MAX_LENGTH, "queries": int(max_query_length),
                                           "corpus": int(max_doc_length)}
        self.batch_size = int(batch_size)
        self._terms: list[str] | None = None

    @property
    def tokenizer(self) -> Any:
        return self.module.tokenizer

    @property
    def vocabulary(self) -> list[str]:
        """The term of each column of :meth:`encode`'s matrix (the tokenizer's word pieces)."""
        if self._terms is None:
            from .encoding import vocabulary

            self._terms = vocabulary(self.module.tokenizer, self.module.vocab_size)
        return self._terms

    def encode(self, texts: Iterable[str], *, kind: Kind = "corpus", output: Literal["sparse", "dict"] = "sparse",
               max_length: int | None = None, top_k: int | None = None, quantize_scale: float | None = None,
               batch_size: int | None = None) -> scipy.sparse.csr_matrix | list[dict[str, float | int]]:
        """Encode ``texts`` in order: a float32 CSR matrix ``(len(texts), vocab)`` (``output="sparse"``), or one
        ``{term: weight}`` dict per text, heaviest first (``output="dict"``; with ``quantize_scale`` the
        integer impacts ``int(w * scale + 0.5)`` > 0 that ``splade-obs encode --quantize-scale`` writes).

        ``kind`` picks the default ``max_length`` (documents 256, queries 64 tokens unless set otherwise).
        """
        from .encoding import KINDS, row_vector

        if kind not in KINDS:
            raise ConfigError(f"kind {kind!r} is not known — expected one of {', '.join(KINDS)}", field="kind")
        if output not in ("sparse", "dict"):
            raise ConfigError(f"output {output!r} is not known — expected sparse or dict", field="output")
        if isinstance(texts, str):
            raise ConfigError("texts is one string; expected a list of strings", field="texts",
                              hint="wrap a single text in a list: encode([text])")
        matrix = self.module.encode(list(texts), max_length=max_length or self.max_length[kind],
                                    batch_size=batch_size or self.batch_size, top_k=top_k)
        if output == "sparse":
            if quantize_scale is not None:
                raise ConfigError("quantize_scale applies to output='dict' only", field="quantize_scale")
            return matrix
        terms = self.vocabulary
        return [row_vector(matrix.indices[matrix.indptr[r]:matrix.indptr[r + 1]],
                           matrix.data[matrix.indptr[r]:matrix.indptr[r + 1]], terms, quantize_scale)
                for r in range(matrix.shape[0])]

    def encode_queries(self, texts: Iterable[str], **options: Any) -> Any:
        """:meth:`encode` with ``kind="queries"``."""
        return self.encode(texts, kind="queries", **options)

    def encode_documents(self, texts: Iterable[str], **options: Any) -> Any:
        """:meth:`encode` with ``kind="corpus"``."""
        return self.encode(texts, kind="corpus", **options)


def _module(model: ModelLike, device: str) -> SpladeModule:
    if isinstance(model, SpladeEncoder):
        return model.module
    if isinstance(model, (str, os.PathLike)):
        return SpladeEncoder(model, device=device).module
    return model


def evaluate(model: ModelLike, beir_dir: str | os.PathLike[str], *,
             split: str = "test", max_query_length: int = 64, max_doc_length: int = 256, batch_size: int = 32,
             max_queries: int | None = None, top_k: int = 100, idf_power: float = 0.0, device: str = "auto",
             progress: str = "none") -> dict[str, float]:
    """Encode a BEIR folder's corpus and queries, retrieve exactly, and return the metrics dict of
    ``splade-obs evaluate`` (``ndcg@10``, ``mrr@10``, ``recall@100``, ``map@100``, sparsity, timings)."""
    from .beir import load_beir
    from .evaluation import RetrievalEvaluator

    beir = load_beir(beir_dir, split, lazy_corpus=True)  # checked before the model loads; text stays on disk
    evaluator = RetrievalEvaluator(beir, max_query_length=max_query_length, max_doc_length=max_doc_length,
                                   batch_size=batch_size, max_queries=max_queries, top_k_retrieve=top_k,
                                   idf_power=idf_power, progress=progress)
    return evaluator.evaluate(_module(model, device))


def encode(model: ModelLike, input_path: str | os.PathLike[str],
           output: str | os.PathLike[str], *, kind: Kind, max_length: int | None = None, batch_size: int = 32,
           top_k: int | None = None, device: str = "auto", progress: str = "none", **options: Any) -> EncodeStats:
    """What ``splade-obs encode`` does: a BEIR folder or an id/text JSONL to sparse vectors in ``output``.

    ``options`` go to :func:`splade_obs.encoding.encode_file` as they are (``quantize_scale=100`` writes integer
    impacts for Anserini's ``JsonVectorCollection``, and the output format options the installed version has).
    """
    from .encoding import encode_file, input_file

    input_file(input_path, kind)  # a wrong path fails before the model loads
    return encode_file(_module(model, device), input_path, output, kind=kind, max_length=max_length,
                       batch_size=batch_size, top_k=top_k, progress=progress, **options)
