"""Retrieval quality on SciFact test: BM25 (bm25s) vs splade-tiny zero-shot vs fine-tuned models, one table,
and the issue's target checked: does a model trained here beat BM25 on nDCG@10?

Every row is scored by the same code (``splade_obs.evaluation``: the BM25 runs through ``compute_metrics``,
the SPLADE models through ``RetrievalEvaluator`` at query length 64 / document length 256), so the numbers
are comparable. Every trained row is compared query by query with each BM25 row (mean difference of nDCG@10,
95% bootstrap interval, paired randomisation p-value: ``splade_obs.significance.paired_comparison``) and the
verdict is printed and written under ``target``; ``--require-target`` makes the script exit 1 when no
trained row is above every BM25 row.

The fine-tuned rows come from two trainers fed the same data:

* ``--train ours``: this project's trainer (``splade_obs.run.run_training``) with ``--config`` (default
  ``benchmarks/configs/scifact_distill.toml``, the README's recipe) on ``--triples``. For a distillation
  config a missing ``--triples`` file is mined with the README's teacher command (``mine-negatives --method
  hybrid --dense-model all-minilm-l6-v2 --no-dense-candidates --teacher-scores --sample --num-negatives 8
  --depth 30 --title-queries``, ~13 min here); for a contrastive config (e.g. ``configs/scifact_finetune.toml``)
  with splade-tiny's hard negatives (``mine-negatives --num-negatives 4 --depth 50``).
* ``--train st``: sentence-transformers' ``SparseEncoderTrainer`` with ``SpladeLoss`` around the loss that
  matches the config, the same model, the same rows (the positive and negatives our collator picks for each
  epoch, all epochs' rows in one dataset that ST's seeded sampler shuffles), batch size, optimizer steps, learning rate and schedule, warm-up, weight
  decay, FLOPS weights, precision and maximum lengths (ST has one ``max_seq_length``: 256; SciFact claims are
  far shorter than 64 tokens, so the query cap does not bind on either side). Losses: a contrastive config
  trains ``SparseMultipleNegativesRankingLoss``; a distillation config (``contrastive_weight = 0``) trains
  ``SparseMarginMSELoss`` (``margin_mse``), ``SparseDistillKLDivLoss`` at the config's temperature (``kl``) or
  the sum of both (``kl_margin_mse``, as ours), on the records' teacher scores (positive first).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_quality.py --train ours --train st \
        --triples /tmp/teacher.jsonl --model "soup=runs/soup"          # add any saved model as a row

Trained models are kept under ``--workdir`` (default /tmp/splade-obs-bench). Writes
benchmarks/results/bench_quality.json. Needs the bench extra (bm25s, PyStemmer, sentence-transformers,
datasets, accelerate).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

# the benchmarks' shared preamble (repository root on sys.path, paths, table printer, results writer)
from _common import CONFIGS, DEFAULT_DATA, KEYS, RESULTS, machine, require_beir, run_cli, table, write_json

DEFAULT_CONFIG = CONFIGS / "scifact_distill.toml"
QUERY_LENGTH = 64


# ------------------------------------------------------------------------------------------- data
# the README's distillation teacher: BM25 + SPLADE + dense scores, negatives drawn by the sparse fusion
TEACHER_MINING = ["--method", "hybrid", "--dense-model", "all-minilm-l6-v2", "--no-dense-candidates",
                  "--teacher-scores", "--sample", "--num-negatives", "8", "--depth", "30", "--title-queries"]
HARD_NEGATIVE_MINING = ["--num-negatives", "4", "--depth", "50"]


def ensure_triples(triples: Path, data: Path, max_doc_length: int, distill: bool) -> Path:
    """Mine the training file once: the README's teacher file for a distillation config, else splade-tiny's
    hard negatives (4 per query from the top 50, positives excluded)."""
    if triples.is_file():
        return triples
    triples.parent.mkdir(parents=True, exist_ok=True)
    run_cli("mine-negatives", "--model", "splade-tiny", "--data", str(data), "--split", "train",
            "--max-doc-length", str(max_doc_length), "--output", str(triples),
            *(TEACHER_MINING if distill else HARD_NEGATIVE_MINING))
    return triples


def distills(cfg) -> bool:  # noqa: ANN001
    """A pure distillation config: no contrastive term, a distillation loss (the data must carry scores)."""
    return cfg.loss.contrastive_weight == 0 and cfg.loss.distillation != "none"


def is_distill(config: Path) -> bool:
    """:func:`distills` of a TOML config file."""
    from splade_obs.config import TrainConfig, flatten, load_config_file

    return distills(TrainConfig.from_mapping(flatten(load_config_file(config)), source=str(config)))


def train_config(config: Path, triples: Path, out_dir: Path, max_steps: int | None = None,
                 overrides: dict[str, Any] | None = None):
    """The TOML config with the data, output and 'no tracking, no tracing' filled in (flags win, as in the CLI)."""
    from splade_obs.config import TrainConfig, flatten, load_config_file

    values = flatten(load_config_file(config))
    values.update({"data.train_file": str(triples), "checkpoint.output_dir": str(out_dir),
                   "tracking.enabled": False, "tracing.exporter": "none", "logging.progress": "lines"})
    if max_steps is not None:
        values["optim.max_steps"] = max_steps
    values.update(overrides or {})
    return TrainConfig.from_mapping(values, source=str(config))


def planned_steps(cfg) -> int:
    """Optimizer steps our trainer runs: full batches only (the last partial batch is dropped)."""
    from splade_obs.data import load_training_data

    if cfg.optim.max_steps:
        return cfg.optim.max_steps
    n = len(load_training_data(cfg.data.train_file).examples)
    per_epoch = n // cfg.optim.batch_size if n >= 2 * cfg.optim.batch_size else 1
    return per_epoch // cfg.optim.gradient_accumulation_steps * cfg.optim.epochs


def collator_picks(cfg, steps: int, k: int):  # noqa: ANN201
    """(example, positive index, negative indices) in our epoch order with our collator's choices, enough for
    ``steps`` batches (whole epochs)."""
    from splade_obs.collate import PairCollator
    from splade_obs.data import epoch_order, load_training_data

    examples = load_training_data(cfg.data.train_file).examples
    collator = PairCollator(None, cfg.model.max_query_length, cfg.model.max_doc_length, num_negatives=k,
                            seed=cfg.optim.seed)
    need, done, epoch = steps * cfg.optim.batch_size, 0, 0
    while done < need:
        for i in epoch_order(len(examples), cfg.optim.seed, epoch):
            ex = examples[i]
            pos, negs = collator.choose(ex, k, collator._rng(epoch, ex))
            done += 1
            yield ex, pos, negs
        epoch += 1


def st_triples(cfg, steps: int) -> dict[str, list[str]]:
    """(anchor, positive, negative) columns: per epoch, the positive and negative our collator picks, in our order."""
    cols: dict[str, list[str]] = {"anchor": [], "positive": [], "negative": []}
    for ex, pos, negs in collator_picks(cfg, steps, 1):
        cols["anchor"].append(ex.query)
        cols["positive"].append(ex.positives[pos])
        cols["negative"].append(ex.negatives[negs[0]])
    return cols


def st_distill_columns(cfg, steps: int) -> dict[str, list]:
    """(query, positive, negative_1..K, label) for ST's distillation losses: our collator's picks, in our order,
    with the teacher's scores ``[score(positive), score(negative_1), ...]`` from the records' ``scores``
    (``SparseMarginMSELoss`` turns them into the margins ``score(positive) - score(negative_i)`` itself)."""
    from splade_obs.data import load_training_data

    k = cfg.data.num_negatives
    if k < 1 or any(ex.scores is None or not ex.negatives for ex in load_training_data(cfg.data.train_file).examples):
        raise SystemExit(f"{cfg.data.train_file}: distillation needs num_negatives >= 1 and every record with "
                         "negatives and teacher scores (mine-negatives --teacher-scores)")
    cols: dict[str, list] = {"query": [], "positive": [], **{f"negative_{i + 1}": [] for i in range(k)}, "label": []}
    for ex, pos, negs in collator_picks(cfg, steps, k):
        cols["query"].append(ex.query)
        cols["positive"].append(ex.positives[pos])
        for j, n in enumerate(negs):
            cols[f"negative_{j + 1}"].append(ex.negatives[n])
        cols["label"].append([ex.scores[0], *(ex.scores[1 + n] for n in negs)])
    return cols


LOSS_NAMES = {"MarginMSEPlusKL": "SparseMarginMSELoss + SparseDistillKLDivLoss"}


def st_distill_loss(model, distillation: str, temperature: float):  # noqa: ANN001, ANN201
    """The sentence-transformers loss that matches ``loss.distillation``: MarginMSE, listwise KL, or their sum
    (each term reported by the trainer under its own name, as ours logs ``distill_margin_mse`` / ``distill_kl``)."""
    import torch
    from sentence_transformers.sparse_encoder.losses import SparseDistillKLDivLoss, SparseMarginMSELoss

    if distillation in ("auto", "margin_mse"):
        return SparseMarginMSELoss(model)
    if distillation == "kl":
        return SparseDistillKLDivLoss(model, temperature=temperature)
    if distillation != "kl_margin_mse":
        raise SystemExit(f"--train st has no sentence-transformers loss for loss.distillation = {distillation!r}")

    class MarginMSEPlusKL(torch.nn.Module):
        """ST's own two losses on the same embeddings and teacher scores, summed by SpladeLoss (dict output)."""

        def __init__(self) -> None:
            super().__init__()
            self.margin_mse = SparseMarginMSELoss(model)
            self.kl = SparseDistillKLDivLoss(model, temperature=temperature)

        def compute_loss_from_embeddings(self, embeddings, labels):  # noqa: ANN001, ANN201
            return {"distill_margin_mse": self.margin_mse.compute_loss_from_embeddings(embeddings, labels),
                    "distill_kl": self.kl.compute_loss_from_embeddings(embeddings, labels)}

    return MarginMSEPlusKL()


def throughput(step_ends: list[float], batch_size: int, skip: int) -> float:
    """Samples/s between the end of step ``skip`` and the last step: start-up and first steps excluded."""
    if len(step_ends) <= skip + 1:
        return float("nan")
    return (len(step_ends) - 1 - skip) * batch_size / (step_ends[-1] - step_ends[skip])


# ------------------------------------------------------------------------------------------- trainers
def train_ours(cfg, skip: int = 3) -> dict[str, Any]:
    """Run this project's trainer; steps' end times come from its own StepDone events."""
    from splade_obs.bus import RecordingSink
    from splade_obs.events import ModelLoaded, StepDone
    from splade_obs.run import run_training

    rec = RecordingSink()
    start = time.perf_counter()
    result = run_training(cfg, extra_sinks=(rec,))
    wall = time.perf_counter() - start
    steps = rec.of(StepDone)
    ends = [s.end_ns / 1e9 for s in steps]
    return {"trainer": "splade-obs", "status": result.status, "model_path": str(cfg.output_dir / "final"),
            "steps": len(steps), "train_wall_s": wall, "batch_size": cfg.optim.batch_size,
            "samples_per_s": throughput(ends, cfg.optim.batch_size, skip),
            "final_loss": steps[-1].loss if steps else None,
            "final_query_nnz": steps[-1].query_nnz if steps else None,
            "final_doc_nnz": steps[-1].doc_nnz if steps else None,
            "head_pass": next((m.head_pass for m in rec.of(ModelLoaded)), ""),
            "dropout_masks": next((m.dropout_masks for m in rec.of(ModelLoaded)), ""),
            "attention": next((m.attention for m in rec.of(ModelLoaded)), "")}


def train_st(cfg, steps: int, out_dir: Path, skip: int = 3, save: bool = True, *, device: str = "cpu",
             amp: Any = "config", on_step: Any = None) -> dict[str, Any]:
    """sentence-transformers' SparseEncoderTrainer with the same data, steps and hyper-parameters as ``cfg``.

    ``device``: where it trains; ``amp``: ``torch.float16`` / ``torch.bfloat16`` / None, or ``"config"`` for
    what ``cfg.optim.mixed_precision`` resolves to on the CPU; ``on_step``: called at each step's end before the
    clock reads (a CUDA synchronize, for the GPU check)."""
    import torch
    from datasets import Dataset
    from sentence_transformers.sparse_encoder import (SparseEncoder, SparseEncoderTrainer,
                                                      SparseEncoderTrainingArguments)
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss
    try:  # sentence-transformers >= 6 moved it; 5.x has only the old path
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:
        from sentence_transformers.training_args import BatchSamplers
    from transformers import TrainerCallback

    from splade_obs.hub import resolve_model
    from splade_obs.device import resolve_amp, resolve_device

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if on_step is not None:
                on_step()
            self.ends.append(time.perf_counter())

    if amp == "config":
        amp = resolve_amp(cfg.optim.mixed_precision, resolve_device("cpu"))
    model = SparseEncoder(resolve_model(cfg.model.name), device=device)
    model.max_seq_length = cfg.model.max_doc_length
    # Pure distillation configs (contrastive_weight 0, teacher scores in the data) train with ST's distillation
    # losses; the rest with in-batch + hard-negative cross-entropy.
    distill = distills(cfg)
    dataset = Dataset.from_dict(st_distill_columns(cfg, steps) if distill else st_triples(cfg, steps))
    inner = (st_distill_loss(model, cfg.loss.distillation, cfg.loss.distillation_temperature) if distill
             else SparseMultipleNegativesRankingLoss(model))
    loss = SpladeLoss(model, inner,
                      query_regularizer_weight=cfg.loss.lambda_q, document_regularizer_weight=cfg.loss.lambda_d)
    args = SparseEncoderTrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=cfg.optim.batch_size,
        learning_rate=cfg.optim.learning_rate,
        warmup_steps=cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else cfg.optim.warmup_ratio,
        weight_decay=cfg.optim.weight_decay, max_grad_norm=cfg.optim.max_grad_norm, lr_scheduler_type="linear",
        fp16=amp == torch.float16, bf16=amp == torch.bfloat16, use_cpu=device == "cpu", seed=cfg.optim.seed,
        dataloader_drop_last=True,
        # NO_DUPLICATES keeps a text from being its own in-batch negative (MNRL); MarginMSE has no in-batch
        # negatives, so a repeated text is harmless there and the plain sampler is used.
        batch_sampler=BatchSamplers.BATCH_SAMPLER if distill else BatchSamplers.NO_DUPLICATES,
        save_strategy="no", report_to="none", logging_steps=10,
        disable_tqdm=True)
    clock = StepClock()
    trainer = SparseEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[clock])
    start = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - start
    final = out_dir / "final"
    if save:
        model.save_pretrained(str(final))
    return {"trainer": "sentence-transformers", "model_path": str(final), "steps": len(clock.ends),
            "train_wall_s": wall, "batch_size": cfg.optim.batch_size,
            "samples_per_s": throughput(clock.ends, cfg.optim.batch_size, skip),
            "final_loss": float(out.training_loss), "bf16": amp == torch.bfloat16,
            "loss": LOSS_NAMES.get(type(inner).__name__, type(inner).__name__)}


# ------------------------------------------------------------------------------------------- rows
def bm25_rows(beir) -> list[dict]:
    """BM25 without stemming, and with Snowball stemming when PyStemmer is installed."""
    from splade_obs.beir import beir_doc_text
    from splade_obs.evaluation import compute_metrics, ndcg_per_query
    from splade_obs.mining import bm25_search

    doc_ids = list(beir.corpus)
    texts = [beir_doc_text(beir.corpus[d]) for d in doc_ids]
    qids = [q for q, rels in beir.qrels.items() if any(r > 0 for r in rels.values()) and q in beir.queries]
    stemmers: list[tuple[str, object]] = [("BM25 (bm25s, no stemming)", None)]
    try:
        import Stemmer  # PyStemmer

        stemmers.append(("BM25 (bm25s, Snowball stemming)", Stemmer.Stemmer("english")))
    except ImportError:
        pass
    rows = []
    for label, stemmer in stemmers:
        start = time.perf_counter()
        ids, scores = bm25_search(doc_ids, texts, [beir.queries[q] for q in qids], 100, stemmer=stemmer)
        run = {q: dict(zip(i, s)) for q, i, s in zip(qids, ids, scores)}
        qrels = {q: beir.qrels[q] for q in qids}
        rows.append({"system": label, "kind": "bm25", **compute_metrics(run, qrels),
                     "seconds": time.perf_counter() - start, "ndcg@10_per_query": ndcg_per_query(run, qrels)})
    return rows


def splade_row(label: str, model: str, beir, max_doc_length: int, batch_size: int, kind: str) -> dict:
    from splade_obs.evaluation import RetrievalEvaluator, ndcg_per_query
    from splade_obs.model import SpladeEncoder

    start = time.perf_counter()
    encoder = SpladeEncoder.from_pretrained(model)
    evaluator = RetrievalEvaluator(beir, max_query_length=QUERY_LENGTH, max_doc_length=max_doc_length,
                                   batch_size=batch_size)
    metrics = evaluator.evaluate(encoder)
    return {"system": label, "kind": kind, "model": model, **{k: metrics[k] for k in KEYS},
            "query_nnz": metrics["query_nnz"], "doc_nnz": metrics["doc_nnz"], "retrieval_flops": metrics["retrieval_flops"],
            "seconds": time.perf_counter() - start,
            "ndcg@10_per_query": ndcg_per_query(evaluator.run(), evaluator.qrels)}


def target_check(rows: list[dict]) -> dict[str, Any]:
    """The issue's target, "the trained model beats BM25 on SciFact test nDCG@10": every trained row against
    every BM25 row, query by query; met when some trained row is above every BM25 row (the claim is "above";
    the p-values say whether it is also significantly above)."""
    from splade_obs.significance import paired_comparison

    bm25 = [r for r in rows if r.get("kind") == "bm25"]
    trained = [r for r in rows if r.get("kind") == "trained" and "ndcg@10_per_query" in r]
    out: dict[str, Any] = {"rule": "a trained row's nDCG@10 above every BM25 row's", "rows": {}}
    for r in trained:
        out["rows"][r["system"]] = {
            "ndcg@10": r["ndcg@10"],
            "above_every_bm25": all(r["ndcg@10"] > b["ndcg@10"] for b in bm25),
            "vs": {b["system"]: paired_comparison(r["ndcg@10_per_query"], b["ndcg@10_per_query"]) for b in bm25}}
    winners = [name for name, v in out["rows"].items() if v["above_every_bm25"]]
    out["met"] = bool(bm25) and bool(winners)
    out["met_by"] = winners
    return out


OURS_ROW = "splade-tiny fine-tuned, splade-obs trainer"
ST_ROW = "splade-tiny fine-tuned, sentence-transformers trainer"


def trainer_comparison(rows: list[dict]) -> dict[str, Any]:
    """The two trainers' models (same loss, rows, steps) query by query: is either trainer's model better?"""
    from splade_obs.significance import paired_comparison

    by_name = {r["system"]: r for r in rows}
    if OURS_ROW not in by_name or ST_ROW not in by_name:
        return {}
    return {"st_minus_ours": paired_comparison(by_name[ST_ROW]["ndcg@10_per_query"],
                                               by_name[OURS_ROW]["ndcg@10_per_query"])}


def comparison_text(c: dict[str, float]) -> str:
    """A paired comparison as 'mean difference [95% CI] p'."""
    return f"{c['mean_diff']:+.4f} [{c['ci95_low']:+.3f}, {c['ci95_high']:+.3f}] p={c['p_value']:.2f}"


def target_lines(target: dict[str, Any]) -> list[str]:
    lines = [f"target ({target['rule']}): {'MET' if target['met'] else 'NOT MET'}"]
    for name, v in target["rows"].items():
        parts = [f"{b}: {comparison_text(c)}" for b, c in v["vs"].items()]
        lines.append(f"  {name} ({v['ndcg@10']:.4f}) vs " + "; ".join(parts))
    return lines


def metrics_row(label: str, path: Path) -> dict:
    """A row from ``splade-obs evaluate --output FILE`` (the same RetrievalEvaluator): no second evaluation."""
    doc = json.loads(Path(path).read_text())
    m = {**doc, **doc.get("metrics", {})}
    return {"system": label, "kind": "metrics file", "model": m.get("model", str(path)), **{k: m[k] for k in KEYS},
            "query_nnz": m["query_nnz"], "doc_nnz": m["doc_nnz"], "retrieval_flops": m["retrieval_flops"], "metrics_file": str(path),
            **({"measured": m["measured"]} if "measured" in m else {})}


def rows_table(rows: list[dict]) -> str:
    columns = [("system", f"<{max(len(r['system']) for r in rows) + 2}"), *((k, ">12", ".4f") for k in KEYS),
               ("q nnz", ">8", ".1f"), ("doc nnz", ">9", ".1f")]
    nnz = lambda r: [r["query_nnz"], r["doc_nnz"]] if "doc_nnz" in r else ["-", "-"]  # noqa: E731
    return table(columns, ([r["system"], *(r[k] for k in KEYS), *nnz(r)] for r in rows), rule=True)


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--split", default="test")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config (TOML) for both trainers")
    ap.add_argument("--triples", type=Path, default=Path("/tmp/splade-obs-bench/scifact_teacher.jsonl"),
                    help="the training file (mined when missing: the teacher file for a distillation config)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/splade-obs-bench"))
    ap.add_argument("--train", action="append", default=[], choices=["ours", "st"],
                    help="fine-tune with this trainer and add the row (repeatable)")
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=PATH",
                    help="an already trained model to add as a row (repeatable)")
    ap.add_argument("--metrics", action="append", default=[], metavar="LABEL=FILE",
                    help="a row from `splade-obs evaluate --output FILE` (same evaluator, not re-run; repeatable)")
    ap.add_argument("--max-doc-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    ap.add_argument("--skip-zero-shot", action="store_true")
    ap.add_argument("--output", type=Path, default=RESULTS / "bench_quality.json")
    ap.add_argument("--require-target", action="store_true",
                    help="exit 1 unless a trained row's nDCG@10 is above every BM25 row's")
    args = ap.parse_args()
    require_beir(args.data)
    from splade_obs.beir import load_beir

    load_start = os.getloadavg()
    training: list[dict] = []
    models = [tuple(spec.partition("=")[::2]) for spec in args.model]
    if args.train:
        triples = ensure_triples(args.triples, args.data, args.max_doc_length, is_distill(args.config))
        cfg = train_config(args.config, triples, args.workdir / "ours")
        steps = planned_steps(cfg)
        if "ours" in args.train:
            info = train_ours(cfg)
            steps = info["steps"]
            training.append(info)
            models.append((OURS_ROW, info["model_path"]))
        if "st" in args.train:
            info = train_st(cfg, steps, args.workdir / "st")
            training.append(info)
            models.append((ST_ROW, info["model_path"]))

    beir = load_beir(args.data, args.split)
    rows = bm25_rows(beir)
    if not args.skip_zero_shot:
        rows.append(splade_row("splade-tiny zero-shot", "splade-tiny", beir, args.max_doc_length, args.batch_size,
                               "zero-shot"))
    for label, path in models:
        rows.append(splade_row(label or Path(path).name, path, beir, args.max_doc_length, args.batch_size,
                               "trained"))
    for spec in args.metrics:
        label, _, path = spec.rpartition("=")
        rows.append(metrics_row(label or Path(path).stem, Path(path)))
    target = target_check(rows)
    trainers = trainer_comparison(rows)
    num_queries = sum(1 for rels in beir.qrels.values() if any(r > 0 for r in rels.values()))
    print(f"SciFact {args.split} ({len(beir.corpus)} docs, {num_queries} queries), query length {QUERY_LENGTH}, "
          f"document length {args.max_doc_length}")
    print(rows_table(rows))
    print("\n".join(target_lines(target)))
    if trainers:
        print("sentence-transformers - splade-obs trainer, nDCG@10 per query: "
              + comparison_text(trainers["st_minus_ours"]))
    result = {"benchmark": "quality", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "data": str(args.data), "split": args.split, "machine": machine(), "load_avg_start": list(load_start),
              "rows": rows, "target": target, "trainers": trainers, "training": training}
    if args.train:
        result["train_config"] = json.loads(json.dumps(cfg.to_dict(), default=str))
        result["triples"] = str(args.triples)
        result["triples_sha256"] = hashlib.sha256(Path(args.triples).read_bytes()).hexdigest()
    write_json(args.output, result)
    print(f"written {args.output}")
    if args.require_target and not target["met"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
