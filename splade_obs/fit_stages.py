"""The stages of ``splade-obs fit`` (:mod:`splade_obs.fit`): split, teacher, tracing, scoring, configs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .atomic import atomic_write_text
from .errors import ApplicationError, DataError

log = logging.getLogger("splade_obs.fit")

#: The training recipe ``fit`` starts from (chosen on a SciFact dev split, docs/recipes.md): MarginMSE + listwise
#: KL from the hybrid teacher, no cross-entropy (a mined "negative" may be an unjudged positive), lr 2e-4,
#: two negatives per query, 2 epochs, no FLOPS (splade-tiny is already sparse).
RECIPE: dict[str, dict[str, Any]] = {
    "model": {"max_query_length": 64, "max_doc_length": 256},
    "data": {"num_negatives": 2},
    "optim": {"epochs": 2, "batch_size": 16, "learning_rate": 2e-4, "warmup_ratio": 0.1, "weight_decay": 0.01},
    "loss": {"lambda_q": 0.0, "lambda_d": 0.0, "distillation": "kl_margin_mse", "contrastive_weight": 0.0},
}
#: The teacher's mining settings (``mine-negatives --method hybrid --teacher-scores --sample``).
MINING = {"method": "hybrid", "num_negatives": 8, "depth": 30, "teacher_scores": True, "sample": True,
          "stemmer": "english", "dense_weight": 0.5, "dense_candidates": False}
DENSE_MODEL = "all-minilm-l6-v2"
#: Seeds trained by ``--seeds N``: the first N of these (the recipe's seeds).
SEEDS = (42, 1, 2, 3, 4, 5, 6, 7)
STAGES = ("split", "teacher", "train", "average", "report")
DEV_CAP = 200


def dev_size(n: int) -> int:
    """Dev queries held out of ``n`` judged train queries: a quarter, at least 1, at most 200."""
    return max(1, min(DEV_CAP, math.ceil(n / 4)))


@dataclass
class FitOptions:
    data: Path
    output_dir: Path
    model: str = "splade-tiny"
    seeds: int = 1
    split_seed: int = 0
    dev_queries: int | None = None      # None: dev_size()
    dense_model: str | None = DENSE_MODEL  # None: BM25 + SPLADE teacher only
    config_file: Path | None = None     # overrides the recipe
    overrides: Mapping[str, Any] = field(default_factory=dict)  # over everything (tracking, tracing, device)
    device: str = "auto"
    progress: str = "none"


@dataclass
class FitResult:
    model_path: str
    chosen: str
    report: dict[str, Any]
    mlflow_run_id: str | None
    trace_id: str | None


class FitState:
    """``<output>/fit_state.json``: each finished stage's outputs, rewritten atomically after each stage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"stages": {}}

    def done(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)

    def save(self, stage: str, value: dict[str, Any]) -> None:
        self.data["stages"][stage] = value
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ split
def split_train_queries(folder: Path, out: Path, n_dev: int | None, seed: int) -> dict[str, Any]:
    """Write ``out`` as a BEIR folder whose ``train``/``dev`` splits partition the train split's judged queries."""
    from .beir import load_beir, training_query_ids

    beir = load_beir(folder, "train")
    judged = sorted(training_query_ids(beir))
    if len(judged) < 2:
        raise DataError(f"qrels/train.tsv has {len(judged)} usable quer{'y' if len(judged) == 1 else 'ies'} — "
                        "expected at least 2 (one to train on, one to hold out as dev)", file_path=str(folder),
                        hint="fit needs a train split with relevance judgements")
    n = dev_size(len(judged)) if n_dev is None else n_dev
    if not 1 <= n < len(judged):
        raise DataError(f"--dev-queries {n} leaves no query to train on or none to choose with "
                        f"({len(judged)} judged train queries)", field="dev_queries",
                        hint=f"pick 1..{len(judged) - 1}")
    dev = set(random.Random(seed).sample(judged, n))
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        _link(folder / name, out / name)
    if (folder / "qrels" / "test.tsv").is_file():
        _link(folder / "qrels" / "test.tsv", out / "qrels" / "test.tsv")
    for split, keep in (("train", lambda q: q not in dev), ("dev", lambda q: q in dev)):
        rows = [f"{q}\t{d}\t{r}" for q, rels in beir.qrels.items() if keep(q) for d, r in rels.items()]
        atomic_write_text(out / "qrels" / f"{split}.tsv", "query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return {"folder": str(out), "dev_queries": sorted(dev), "train_queries": len(judged) - n,
            "has_test": (out / "qrels" / "test.tsv").is_file(), "source_digest": beir.digest, "seed": seed}


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        dst.symlink_to(src.resolve())
    except OSError:  # no symlinks here (some filesystems): a copy
        shutil.copyfile(src, dst)


# ------------------------------------------------------------------------------------------------ teacher
def teacher_digest(data: Path, model_path: str, dense: str | None, title_queries: bool) -> str:
    """What the teacher file depends on: the corpus, queries and train qrels, the models and the settings."""
    from .data import file_digest

    h = hashlib.sha256()
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv"):
        h.update(f"{name}:{file_digest(data / name)}\n".encode())
    weights = Path(model_path) / "model.safetensors"
    h.update(f"model:{file_digest(weights) if weights.is_file() else model_path}\n".encode())
    h.update(json.dumps({**MINING, "dense": dense, "title_queries": title_queries}, sort_keys=True).encode())
    return h.hexdigest()


def has_titles(data: Path) -> bool:
    """Whether most documents have a title (then titles make pseudo-queries)."""
    from .beir import CorpusFile

    corpus = CorpusFile(data / "corpus.jsonl")
    sample = corpus.read(range(0, len(corpus), max(1, len(corpus) // 500)))
    return sum(bool(d["title"].strip()) for d in sample) > len(sample) / 2


def build_teacher(data: Path, model: str, dense_model: str | None, out: Path, *, device: str,
                  progress: str) -> dict[str, Any]:
    from .beir import load_beir
    from .hub import resolve_model
    from .mining import load_dense_encoder, make_stemmer, mine_negatives, write_jsonl
    from .model import SpladeEncoder

    dense_name = dense_model if dense_model and _have_sentence_transformers() else None
    if dense_model and dense_name is None:
        log.warning("sentence-transformers is not installed: the teacher is BM25 + SPLADE without the dense "
                    "model (pip install 'splade-obs[bench]' for the three-way teacher)")
    titles = has_titles(data)
    model_path = resolve_model(model)
    digest = teacher_digest(data, model_path, dense_name, titles)
    path = out / f"teacher-{digest[:16]}.jsonl"
    info = {"file": str(path), "digest": digest, "dense_model": dense_name, "title_queries": titles}
    if path.is_file():
        log.info("teacher file reused (inputs unchanged, digest %s): %s", digest[:16], path)
        return {**info, "reused": True, "records": sum(1 for _ in open(path, encoding="utf-8"))}
    beir = load_beir(data, "train")
    encoder = SpladeEncoder.from_pretrained(model, device=device)
    dense = load_dense_encoder(dense_name, device="cpu" if device == "auto" else device) if dense_name else None
    opts = {k: v for k, v in MINING.items() if k != "stemmer"}
    result = mine_negatives(beir, encoder=encoder, stemmer=make_stemmer(MINING["stemmer"]), title_queries=titles,
                            dense_encoder=dense, progress=progress, **opts)
    if not result.records:
        raise DataError("the teacher kept no training record (no query has a negative left)", file_path=str(data))
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(result.records, path)  # atomic: an interrupted stage leaves no half file to reuse
    log.info("teacher file: %d records (%d from titles) in %.1fs -> %s", len(result.records),
             result.num_title_queries, result.seconds, path)
    return {**info, "reused": False, "records": len(result.records), "seconds": result.seconds,
            "title_query_records": result.num_title_queries}


def _have_sentence_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("sentence_transformers") is not None


# ------------------------------------------------------------------------------------------------ tracing
class FitTrace:
    """The fit's spans: one ``fit`` span, a child per stage; their traceparents parent the training runs."""

    def __init__(self, exporter: str, log_dir: Path, service_name: str | None, timeout: float, *,
                 mlflow: tuple[str, str, str] | None = None, run_name: str = "fit") -> None:
        """``mlflow``: (tracking URI, experiment id, run id) to put the trace in that store, linked to that run
        (the seeds' spans join it: their runs' spans are children of the stage spans)."""
        self.pipeline, self.timeout, self.root, self.trace_id = None, timeout, None, None
        if exporter == "none":
            return
        from opentelemetry import trace

        from .sinks.otel.exporters import build_exporters, build_pipeline, build_resource

        log_dir.mkdir(parents=True, exist_ok=True)
        self.pipeline = build_pipeline(build_resource(service_name))
        for name, exp in build_exporters(exporter, log_dir, 0):
            self.pipeline.add(name, exp)
        if mlflow is not None:
            from .sinks.otel.mlflow_export import trace_exporter

            uri, exp_id, run_id = mlflow
            to_store = trace_exporter(uri, lambda: (exp_id, run_id), timeout)
            if to_store is not None:
                self.pipeline.add("mlflow", to_store)
        self.tracer = self.pipeline.provider.get_tracer("splade_obs.fit")
        from .sinks.otel.mlflow_export import TRACE_NAME_ATTRIBUTE

        self.root = self.tracer.start_span("fit", attributes={"splade.run_name": run_name,
                                                              TRACE_NAME_ATTRIBUTE: run_name})
        self.trace_id = trace.format_trace_id(self.root.get_span_context().trace_id)
        self._trace = trace

    @contextlib.contextmanager
    def stage(self, name: str, **attributes: Any) -> Iterator[Any]:
        if self.pipeline is None:
            yield None
            return
        span = self.tracer.start_span(f"fit.{name}", context=self._trace.set_span_in_context(self.root),
                                      attributes={k: v for k, v in attributes.items() if v is not None})
        try:
            yield span
        except BaseException as exc:
            _record_error(span, exc, self._trace)
            raise
        finally:
            span.end()

    def close(self, status: str, error: BaseException | None = None) -> None:
        if self.pipeline is None:
            return
        self.root.set_attribute("splade.status", status)
        if error is not None:
            _record_error(self.root, error, self._trace)
        self.root.end()
        self.pipeline.shutdown(self.timeout)


def span_traceparent(span: Any) -> str | None:
    if span is None:
        return None
    from .sinks.otel.attributes import traceparent

    return traceparent(span.get_span_context())


def _record_error(span: Any, exc: BaseException, trace: Any) -> None:
    from opentelemetry.trace import Status, StatusCode

    from .redaction import safe_text

    category = exc.category.value if isinstance(exc, ApplicationError) else "UNKNOWN_ERROR"
    span.add_event("exception", {"exception.type": type(exc).__name__, "exception.message": safe_text(str(exc))[:500],
                                 "error.category": category})
    span.set_status(Status(StatusCode.ERROR, f"{category}: {type(exc).__name__}"))


# ------------------------------------------------------------------------------------------------ scoring
def score_systems(data: Path, splits: list[str], models: Mapping[str, str], *, device: str,
                  progress: str = "none", bm25: bool = True, lengths: tuple[int, int] = (64, 256),
                  amp_dtype: Any = None) -> dict[str, dict[str, Any]]:
    """``{split: {system: {"metrics": ..., "per_query": {qid: ndcg@10}}}}``: each model encodes the corpus once
    and every split's queries (``lengths``: query, document; under autocast to ``amp_dtype`` when given, as a
    training run's evaluation does), retrieved exactly; BM25 with and without stemming."""
    from .beir import load_beir
    from .evaluation import InvertedIndex, RetrievalEvaluator, compute_metrics, ndcg_per_query, run_from_search
    from .mining import bm25_search, make_stemmer
    from .model import SpladeEncoder
    from .progress_util import as_spec, encode_in_blocks

    chosen = {s: RetrievalEvaluator(load_beir(data, s, lazy_corpus=True)) for s in splits}  # the queries scored
    first = next(iter(chosen.values()))
    out: dict[str, dict[str, Any]] = {s: {} for s in splits}

    def record(split: str, name: str, found: Any, scores: Any) -> None:
        ev = chosen[split]
        run = run_from_search(ev.query_ids, found, scores)
        out[split][name] = {"metrics": compute_metrics(run, ev.qrels), "per_query": ndcg_per_query(run, ev.qrels)}

    spec = as_spec(progress)
    for name, path in models.items():
        encoder = SpladeEncoder.from_pretrained(path, device=device)
        encoder.eval()
        bar = spec.start(f"Encoding documents ({name})", len(first.doc_texts), unit="texts")
        with bar if bar is not None else contextlib.nullcontext():
            docs = encode_in_blocks(encoder, first.doc_texts, max_length=lengths[1], batch_size=32,
                                    amp_dtype=amp_dtype, progress=bar)
        index = InvertedIndex(docs, first.doc_ids)
        for split, ev in chosen.items():
            queries = encoder.encode(ev.query_texts, max_length=lengths[0], batch_size=32, amp_dtype=amp_dtype)
            record(split, name, *index.search(queries, 100))
    if bm25:
        texts = list(first.doc_texts)
        for name, stem in (("bm25-stemmed", "english"), ("bm25", None)):
            for split, ev in chosen.items():
                found, scores = bm25_search(first.doc_ids, texts, ev.query_texts, 100, make_stemmer(stem))
                record(split, name, found, [list(x) for x in scores])
    return out


def dev_ndcg(model: str, data: Path, *, device: str, lengths: tuple[int, int] = (64, 256),
             amp_dtype: Any = None) -> float:
    """A model's nDCG@10 on the dev split (the soup's check against its seeds)."""
    res = score_systems(data, ["dev"], {"m": model}, device=device, bm25=False, lengths=lengths,
                        amp_dtype=amp_dtype)
    return res["dev"]["m"]["metrics"]["ndcg@10"]


# ------------------------------------------------------------------------------------------------ helpers
def train_config(opts: FitOptions, data: Path, teacher: str, seed: int, out: Path) -> Any:
    """The recipe < the user's config file < what fit sets (data, dev evaluation, output, seed)."""
    from .config import TrainConfig, load_config_file

    layers: list[tuple[Mapping[str, Any], str]] = [({**RECIPE, "model": {**RECIPE["model"], "name": opts.model}},
                                                    "fit recipe")]
    if opts.config_file is not None:
        layers.append((load_config_file(opts.config_file), str(opts.config_file)))
    layers.append((opts.overrides, "command line"))
    forced = {"data.train_file": teacher, "eval.eval_data": str(data), "eval.eval_split": "dev",
              "eval.save_best_metric": "ndcg@10", "checkpoint.output_dir": str(out), "checkpoint.resume": "auto",
              "optim.seed": seed}
    layers.append((forced, "splade-obs fit"))
    cfg = TrainConfig.from_sources(*layers)
    per_epoch = max(1, math.ceil(sum(1 for _ in open(teacher, encoding="utf-8")) / cfg.optim.batch_size))
    return cfg.replace(eval={"eval_steps": per_epoch})  # dev nDCG@10 at each epoch's end, the best one kept


def chosen_model(seed_dir: Path) -> Path:
    return seed_dir / "best" if (seed_dir / "best").is_dir() else seed_dir / "final"


def copy_model(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0
