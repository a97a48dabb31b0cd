"""GPU check (issue 36): training samples/s and encoding docs/s against sentence-transformers on the same GPU,
under fp16 and bf16, and the AMP behaviour checks, in one script inside a time budget (default 8 minutes).

* **Training**: this trainer (``splade_obs.run.run_training``, via ``bench_quality.train_ours``) and
  sentence-transformers' ``SparseEncoderTrainer`` (``SpladeLoss`` around ``SparseMultipleNegativesRankingLoss``:
  the loss of ``configs/scifact_finetune.toml``) on the same rows (``bench_quality.st_triples``: our collator's
  picks, in our order), batch size, steps, lengths (64 / 256) and precision (each side's own AMP: our trainer's
  autocast + GradScaler, the Hugging Face trainer's ``fp16`` / ``bf16``). Samples/s between the end of step
  ``--skip-steps`` and the last step (``bench_quality.throughput``); the sentence-transformers step clock
  synchronises CUDA at each step end, as our trainer's per-step loss read does. ``--repeats`` runs of each side,
  alternating (ours, theirs, ours, ...) so a drift of the machine reaches both; each side's samples/s is the
  median of its runs (all of them under ``runs_samples_per_s``). Target: ours >= 2x theirs, medians.
  ``--repeats`` more runs of ours in bf16 take the step before one pass (the queries in an encoder pass of their
  own, the documents together: ``profile_train.step_passes``; the 2026-12-05 runs had three passes), so the
  check measures what one pass a step gains on the GPU (``one_pass_speedup``).
* **Encoding**: ``SpladeEncoder.encode`` vs ``SparseEncoder.encode`` (output copied to the CPU on both sides)
  on the same ``--encode-docs`` documents, length 256, under ``torch.autocast`` at each precision; the median
  of ``--encode-reps`` timed passes after a warm-up; both sides' vectors of the first documents are compared
  (cosine) so the two encode the same thing.
* **AMP behaviour** (``gpu_amp_check``'s functions): clean fp16 and bf16 runs stay finite with no skipped
  batch; fp16 has a GradScaler, bf16 none; an injected fp16 overflow (``batch:2:overflow``) skips the step and
  lowers the scale; an interrupted fp16 run resumes with the scale restored; the fused head matches the
  reference under fp16 and bf16 autocast.

Data: SciFact's train split (query, a relevant abstract, a seeded random abstract as the negative) and its
corpus from ``--data`` when present; otherwise the bundled demo data (``splade_obs/demo``, shorter texts, the
corpus repeated up to ``--encode-docs``), with a printed note and ``data.source = "demo"`` in the JSON.
Sizes shrink when the budget runs short (said under ``budget.scaled``); at the budget's end the results so far
are written with ``budget.exceeded = true``. The script exits 0 whether or not the target is met: the verdict
is printed and stored under ``target``. sentence-transformers, datasets and accelerate: the bench extra.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_h100.json          # on a lent GPU
    .venv/bin/python benchmarks/gpu_check.py --cpu-dry-run --out /tmp/gpu_check.json      # CI: tiny, on CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import math
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# the benchmarks' shared preamble (repository root on sys.path, paths, table printer, results writer)
from _common import CONFIGS, DEFAULT_DATA, RESULTS, ROOT, machine, table, write_json

import torch

import bench_quality as bq
import gpu_amp_check as gac
from profile_train import step_passes

TARGET = 2.0  # issue 36: training samples/s at least 2x sentence-transformers'
FORMER = "splade_obs_queries_apart"  # our bf16 run with the former step's two encoder passes
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEMO = ROOT / "splade_obs" / "demo"
# the dry run's sizes are tiny because fp16 on a CPU is emulated (~20x slower than bf16 there)
GPU_SIZES = {"repeats": 3, "train_steps": 200, "skip_steps": 10, "train_batch": 16, "query_length": 64,
             "doc_length": 256, "encode_docs": 2048, "encode_batch": 64, "encode_reps": 3, "amp_steps": 40,
             "amp_batch": 32, "amp_query_length": 32, "amp_doc_length": 128, "resume_steps": 10}
DRY_SIZES = {"repeats": 1, "train_steps": 3, "skip_steps": 1, "train_batch": 2, "query_length": 8, "doc_length": 16,
             "encode_docs": 16, "encode_batch": 8, "encode_reps": 1, "amp_steps": 3, "amp_batch": 2,
             "amp_query_length": 8, "amp_doc_length": 16, "resume_steps": 2}


class BudgetExceeded(BaseException):
    """The budget's end: a BaseException, so that no library's ``except Exception`` swallows it."""


class Budget:
    """Wall-clock budget: ``left()`` seconds remain; SIGALRM at the end raises :class:`BudgetExceeded`."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start, self.scaled, self.expired = seconds, time.perf_counter(), [], False
        if hasattr(signal, "SIGALRM"):
            signal.signal(signal.SIGALRM, self._expired)
            signal.setitimer(signal.ITIMER_REAL, seconds)

    def _expired(self, *_: Any) -> None:
        self.expired = True
        self.check()

    def check(self) -> None:
        """Raise at the budget's end (also after code that caught the alarm's exception and went on)."""
        if self.expired:
            raise BudgetExceeded(f"budget of {self.seconds:.0f} s spent")

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def used(self) -> float:
        return time.perf_counter() - self.start

    def stop(self) -> None:
        if hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, 0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def guarded(fn: Callable[[], dict]) -> dict:
    """One measurement; a failure is recorded (one line) instead of ending the check. The budget's end is not."""
    try:
        return fn()
    except BudgetExceeded:
        raise
    except Exception as exc:  # noqa: BLE001 - a lent GPU's minutes are better spent on the other parts
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]}


# ------------------------------------------------------------------------------------------- data
def training_file(data: Path, out: Path) -> tuple[Path, dict]:
    """SciFact train as a JSONL training file (query, its relevant abstracts, one seeded random abstract as the
    negative); the bundled demo training file when ``data`` is not a BEIR folder."""
    if not (data / "corpus.jsonl").is_file() or not (data / "qrels" / "train.tsv").is_file():
        note = f"SciFact not found at {data}: training on the bundled demo data ({DEMO / 'train.jsonl'})"
        return DEMO / "train.jsonl", {"source": "demo", "path": str(DEMO / "train.jsonl"), "note": note}
    from splade_obs.beir import beir_doc_text, load_beir

    beir = load_beir(data, "train")
    ids, rng, n = list(beir.corpus), random.Random(0), 0
    with out.open("w") as f:
        for qid, rels in beir.qrels.items():
            pos = [d for d, r in rels.items() if r > 0 and d in beir.corpus]
            if qid not in beir.queries or not pos:
                continue
            neg = rng.choice(ids)
            while neg in pos:
                neg = rng.choice(ids)
            f.write(json.dumps({"query": beir.queries[qid], "positives": [beir_doc_text(beir.corpus[d]) for d in pos],
                                "negatives": [beir_doc_text(beir.corpus[neg])]}) + "\n")
            n += 1
    return out, {"source": "scifact", "path": str(data), "train_queries": n,
                 "negatives": "one random abstract per query (seed 0): throughput does not depend on hardness"}


def encoding_docs(data: Path, n: int) -> tuple[list[str], dict]:
    """The first ``n`` SciFact abstracts (title + text), or the demo corpus repeated up to ``n``."""
    from splade_obs.beir import beir_doc_text, iter_jsonl_objects

    path = data / "corpus.jsonl"
    source = "scifact" if path.is_file() else "demo"
    if source == "demo":
        path = DEMO / "retrieval" / "corpus.jsonl"
    docs = []
    for _, obj in iter_jsonl_objects(path, str(path)):
        docs.append(beir_doc_text(obj))
        if len(docs) >= n:
            break
    unique = len(docs)
    docs = (docs * (n // max(1, unique) + 1))[:n]
    return docs, {"source": source, "path": str(path), "docs": len(docs), "unique_docs": unique}


# ------------------------------------------------------------------------------------------- training
def train_st_on(cfg, steps: int, out_dir: Path, skip: int, device: str, amp: torch.dtype) -> dict:  # noqa: ANN001
    """``bench_quality.train_st`` (the peer trainer, the same rows and settings) on ``device`` under ``amp``."""
    info = bq.train_st(cfg, steps, out_dir, skip=skip, save=False, device=device, amp=amp,
                       on_step=lambda: sync(device))
    return {k: info[k] for k in ("steps", "train_wall_s", "samples_per_s", "final_loss")}


def train_run(side: str, precision: str, triples: Path, tmp: Path, device: str, sizes: dict,
              passes: int | None = None, repeat: int = 0) -> dict:
    """One side's training run; samples/s after ``skip_steps``, wall time and peak GPU memory. ``passes``: ours
    with that many encoder passes a step (:func:`step_passes`)."""
    overrides = {"optim.mixed_precision": precision, "optim.device": device, "logging.progress": "none",
                 "model.max_query_length": sizes["query_length"], "model.max_doc_length": sizes["doc_length"],
                 "optim.batch_size": sizes["train_batch"]}
    out = tmp / f"train-{side}-{precision}{'' if passes is None else f'-{passes}-passes'}-{repeat}"
    cfg = bq.train_config(CONFIGS / "scifact_finetune.toml", triples, out, max_steps=sizes["train_steps"],
                          overrides=overrides)
    reset_peak(device)
    t0 = time.perf_counter()
    if side == "splade_obs":
        with step_passes(passes):
            info = bq.train_ours(cfg, skip=sizes["skip_steps"])
        info = {k: info[k] for k in ("status", "steps", "train_wall_s", "samples_per_s", "final_loss", "attention")}
    else:
        info = train_st_on(cfg, sizes["train_steps"], out, sizes["skip_steps"], device, PRECISIONS[precision])
    sync(device)
    info.update(wall_s=time.perf_counter() - t0, peak_gpu_mb=peak_mb(device), batch_size=cfg.optim.batch_size)
    return info


# ------------------------------------------------------------------------------------------- encoding
def encode_run(side: str, precision: str, docs: list[str], device: str, sizes: dict) -> tuple[dict, Any]:
    """One side's encoding: docs/s (median of the timed passes) and the first 16 documents' vectors (dense)."""
    from splade_obs.hub import resolve_model
    from splade_obs.model import SpladeEncoder

    amp, batch, length = PRECISIONS[precision], sizes["encode_batch"], sizes["doc_length"]
    reset_peak(device)
    if side == "splade_obs":
        enc = SpladeEncoder.from_pretrained("splade-tiny", device=device)
        enc.eval()

        def once(texts: list[str]):  # noqa: ANN202
            m = enc.encode(texts, max_length=length, batch_size=batch, amp_dtype=amp)
            return m.nnz, torch.from_numpy(m[:16].toarray())
    else:
        from sentence_transformers.sparse_encoder import SparseEncoder
        model = SparseEncoder(resolve_model("splade-tiny"), device=device)
        model.max_seq_length = length

        def once(texts: list[str]):  # noqa: ANN202
            with torch.autocast(device, dtype=amp):
                emb = model.encode(texts, batch_size=batch, show_progress_bar=False, convert_to_sparse_tensor=True,
                                   save_to_cpu=True)
            emb = emb.coalesce()
            return emb._nnz(), emb.index_select(0, torch.arange(min(16, len(texts)))).to_dense().float()
    once(docs[:batch])  # warm-up: weights on the device, kernels chosen
    times = []
    for _ in range(sizes["encode_reps"]):
        sync(device)
        t0 = time.perf_counter()
        nnz, first = once(docs)
        sync(device)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"docs_per_s": len(docs) / sec, "seconds": [round(t, 4) for t in times], "docs": len(docs),
            "nnz_per_doc": nnz / len(docs), "peak_gpu_mb": peak_mb(device)}, first


# ------------------------------------------------------------------------------------------- AMP behaviour
def scale_halved_across(trace: list[list], batch_no: int, initial: float = 2.0 ** 16) -> bool:
    """Whether the GradScaler's scale at the first step taken after epoch 1's batch ``batch_no`` (1-based) is at
    most half its scale before that batch (the last step taken before it, or ``initial`` when none was), and the
    batch took no step: its step was skipped for an overflow. ``trace``: ``[epoch, batch index (0-based),
    scale]`` per step taken."""
    if any(epoch == 1 and index + 1 == batch_no for epoch, index, _ in trace):
        return False  # the batch's step was taken
    before = [scale for epoch, index, scale in trace if epoch == 1 and index + 1 < batch_no]
    after = [scale for epoch, index, scale in trace if epoch > 1 or index + 1 > batch_no]
    return bool(after) and after[0] <= (before[-1] if before else initial) / 2


def amp_checks(device: str, tmp: Path, sizes: dict) -> dict:
    """gpu_amp_check's runs, reduced to pass/fail verdicts (the numbers kept beside them)."""
    gac.DEVICE = device
    steps, batch, lengths = sizes["amp_steps"], sizes["amp_batch"], (sizes["amp_query_length"], sizes["amp_doc_length"])
    fp16 = gac.train_once("fp16", tmp / "amp-fp16", steps, batch, lengths=lengths)
    bf16 = gac.train_once("bf16", tmp / "amp-bf16", steps, batch, lengths=lengths)
    # the clean fp16 run again with batch 2's loss scaled to 1e30: one more skipped step, a lower final scale
    over = gac.train_once("fp16", tmp / "amp-overflow", steps, batch, faults=("batch:2:overflow",), lengths=lengths)
    resume = gac.resume_fp16(tmp / "amp-resume", batch, sizes["resume_steps"], lengths)
    heads = [gac.head_agreement(torch.float16), gac.head_agreement(torch.bfloat16)]

    def clean(r: dict) -> bool:
        return r["status"] == "FINISHED" and r["all_finite"] and not r["counters"].get("train/skipped_batches")
    checks = {
        "fp16_clean_run_finite": clean(fp16), "bf16_clean_run_finite": clean(bf16),
        "fp16_uses_grad_scaler_bf16_none": fp16["grad_scale_last"] is not None and bf16["grad_scale_last"] is None,
        # the forced overflow is skipped and at least halves the scale across batch 2: the step after it runs at
        # half the scale of the step before it, or less (emulated fp16 on a CPU can also overflow by itself, at any
        # batch, so the final scales of the two runs say nothing)
        "grad_scale_drops_on_overflow": (over["status"] == "FINISHED" and fp16["grad_scale_last"] is not None
                                         and over["counters"].get("train/overflow_steps", 0) >= 1
                                         and scale_halved_across(over["grad_scale_trace"], 2)),
        "fp16_resume_restores_scaler": (resume["resumed_status"] == "FINISHED"
                                        and resume["resumed_scale"] == resume["straight_scale"] is not None),
    }
    for h in heads:
        ok = h["grad_cosine"] > 0.999 and h["forward_max_rel_diff"] < 0.02  # tolerances of test_gpu_amp_check
        checks[f"fused_head_matches_reference_{h['dtype']}"] = ok
    runs = {"fp16": fp16, "bf16": bf16, "fp16_overflow_at_batch_2": over}
    return {"runs": runs, "resume_fp16": resume, "heads": heads, "checks": checks, "all_ok": all(checks.values())}


# ------------------------------------------------------------------------------------------- report
def finite(x: object) -> bool:
    """A positive finite number (``throughput`` gives NaN when too few steps ran)."""
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def median_run(runs: list[dict]) -> dict:
    """The run of median samples/s among ``runs`` that did not fail and measured a rate (the lower middle one of
    an even count), its ``samples_per_s`` the median itself, with every run's under ``runs_samples_per_s`` (None:
    failed); the last run when none measured one."""
    ok = sorted((r for r in runs if "error" not in r and finite(r.get("samples_per_s"))),
                key=lambda r: r["samples_per_s"])
    if not ok:
        return dict(runs[-1])
    out = dict(ok[(len(ok) - 1) // 2])
    out["samples_per_s"] = statistics.median(r["samples_per_s"] for r in ok)
    out["runs_samples_per_s"] = [r.get("samples_per_s") for r in runs]
    return out


def ratio(pair: dict, key: str) -> float | None:
    a, b = pair.get("splade_obs", {}).get(key), pair.get("sentence_transformers", {}).get(key)
    return a / b if a and b and a == a and b == b else None


def target_verdict(report: dict) -> dict:
    ratios = {p: report["training"].get(p, {}).get("ratio") for p in PRECISIONS}
    done = all(r is not None for r in ratios.values())
    met = done and all(r >= TARGET for r in ratios.values())
    verdict = ("met" if met else "missed") if done else "incomplete"
    text = ("training samples/s, splade-obs / sentence-transformers: "
            + ", ".join(f"{p} {'-' if r is None else f'{r:.2f}x'}" for p, r in ratios.items())
            + f" (target >= {TARGET:.0f}x): {verdict}"
            + (" [CPU dry run: not a GPU result]" if report["cpu_dry_run"] else ""))
    return {"metric": "training samples/s ratio, splade-obs / sentence-transformers", "threshold": TARGET,
            "ratios": ratios, "met": met, "verdict": verdict, "text": text}


def print_tables(report: dict) -> None:
    rows = []
    for part, key, unit in (("training", "samples_per_s", "samples/s"), ("encoding", "docs_per_s", "docs/s")):
        for p, pair in report[part].items():
            cell = [pair.get(s, {}).get(key) for s in ("splade_obs", "sentence_transformers")]
            rows.append([f"{part} {unit}, {p}", *("-" if c is None else f"{c:.1f}" for c in cell),
                         "-" if pair.get("ratio") is None else f"{pair['ratio']:.2f}x"])
    print(table([("", "<28"), ("splade-obs", ">12"), ("sentence-tf", ">13"), ("ratio", ">8")], rows, rule=True))
    for part in ("training", "encoding"):
        for p, pair in report[part].items():
            for side in ("splade_obs", "sentence_transformers"):
                if "error" in pair.get(side, {}):
                    print(f"{part} {p} {side} failed: {pair[side]['error']}")
    former = report["training"].get("bf16", {}).get(FORMER)
    if former is not None:
        gain = report["training"]["bf16"].get("one_pass_speedup")
        print(f"training bf16, the former step (queries in a pass of their own): "
              f"{former.get('samples_per_s', float('nan')):.1f} samples/s; one pass a step: "
              f"{'-' if gain is None else f'{gain:.2f}x'} that" + (f" (failed: {former['error']})"
                                                                  if "error" in former else ""))
    used = sorted({pair["splade_obs"].get("attention") or "?" for pair in report["training"].values()
                   if "splade_obs" in pair and "error" not in pair["splade_obs"]})
    if used:  # splade_obs_cpu: the padding mask built with no read-back; sdpa: it failed its check (a warning)
        print("our attention:", ", ".join(used))
    if report.get("amp"):
        print("AMP checks:", ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in report["amp"]["checks"].items()))
    print(report["target"]["text"])


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("sentence-transformers", "transformers", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SciFact (BEIR folder); demo data when absent")
    ap.add_argument("--budget-minutes", type=float, default=8.0)
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same code path on CPU with tiny sizes (CI)")
    for k, v in GPU_SIZES.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"default {v} on a GPU, {DRY_SIZES[k]} dry")
    args = ap.parse_args()
    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs on a GPU machine (or pass --cpu-dry-run)")
    missing = [m for m in ("sentence_transformers", "datasets", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"note: {', '.join(missing)} not importable: the sentence-transformers side will fail (bench extra; "
              "on a lent GPU carry the wheels, see docs/benchmarks.md#gpu-check)")
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else v
             for k, v in (DRY_SIZES if args.cpu_dry_run else GPU_SIZES).items()}
    budget = Budget(args.budget_minutes * 60)
    report: dict[str, Any] = {
        "benchmark": "gpu_check", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu_dry_run": args.cpu_dry_run,
        "device": {"device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                   "cuda": torch.version.cuda,
                   "bf16_supported": torch.cuda.is_bf16_supported() if device == "cuda" else None,
                   "missing_packages": missing, "versions": versions(), **machine()},
        "sizes": dict(sizes), "training": {}, "encoding": {}, "amp": None,
        "budget": {"minutes": args.budget_minutes, "scaled": budget.scaled, "exceeded": False}}
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            run_all(report, Path(tmp), args.data, device, sizes, budget)
    except BudgetExceeded as exc:
        report["budget"]["exceeded"] = True
        budget.scaled.append(f"stopped: {exc}; the parts not reached are missing")
    finally:
        budget.stop()
    report["budget"]["used_s"] = round(budget.used(), 1)
    report["target"] = target_verdict(report)
    print_tables(report)
    write_json(args.out, report)
    print(f"written {args.out}")


def run_all(report: dict, tmp: Path, data: Path, device: str, sizes: dict, budget: Budget) -> None:
    triples, report["data"] = training_file(data, tmp / "train.jsonl")
    if report["data"].get("note"):
        print("note:", report["data"]["note"])
    # training: a pair of runs (ours, theirs) per precision, steps shrunk between pairs (never inside one) when
    # the pair before would not fit in its share of 75% of the budget left (the rest: encoding, AMP checks)
    walls: list[float] = []
    for i, precision in enumerate(PRECISIONS):
        per_pair = budget.left() * 0.75 / (len(PRECISIONS) - i)
        if walls and max(walls) > per_pair and sizes["train_steps"] > sizes["skip_steps"] + 5:
            steps = max(sizes["skip_steps"] + 5, int(sizes["train_steps"] * per_pair / max(walls)))
            budget.scaled.append(f"training steps {sizes['train_steps']} -> {steps} from {precision} on "
                                 f"({budget.left():.0f} s left)")
            sizes["train_steps"] = steps
        t0, pair = time.perf_counter(), report["training"].setdefault(precision, {})
        runs: dict[str, list[dict]] = {"splade_obs": [], "sentence_transformers": []}
        for repeat in range(sizes["repeats"]):
            for side, done in runs.items():
                done.append(guarded(lambda: train_run(side, precision, triples, tmp, device, sizes, repeat=repeat)))
                pair[side] = median_run(done)
                pair[side]["requested_steps"] = sizes["train_steps"]
                budget.check()
        walls.append(time.perf_counter() - t0)
        pair["ratio"] = ratio(pair, "samples_per_s")
    if "bf16" in report["training"]:  # the former step, queries apart: what one pass a step gains here
        bf16 = report["training"]["bf16"]
        former_runs: list[dict] = []
        for repeat in range(sizes["repeats"]):
            former_runs.append(guarded(lambda: train_run("splade_obs", "bf16", triples, tmp, device, sizes, passes=2,
                                                         repeat=repeat)))
            bf16[FORMER] = median_run(former_runs)
            budget.check()
        now, former = bf16["splade_obs"].get("samples_per_s"), bf16[FORMER].get("samples_per_s")
        bf16["one_pass_speedup"] = now / former if finite(now) and finite(former) else None
        budget.check()
    docs, report["data"]["encoding"] = encoding_docs(data, sizes["encode_docs"])
    for precision in PRECISIONS:
        pair, first = report["encoding"].setdefault(precision, {}), {}
        for side in ("splade_obs", "sentence_transformers"):
            def one() -> dict:
                info, first[side] = encode_run(side, precision, docs, device, sizes)
                return info
            pair[side] = guarded(one)
            budget.check()
        pair["ratio"] = ratio(pair, "docs_per_s")
        if len(first) == 2:
            cos = torch.nn.functional.cosine_similarity(first["splade_obs"], first["sentence_transformers"], dim=1)
            pair["agreement_min_cosine"] = float(cos.min())
    if budget.left() < 60 and sizes["amp_steps"] > 10:
        budget.scaled.append(f"AMP check steps {sizes['amp_steps']} -> 10 ({budget.left():.0f} s left)")
        sizes["amp_steps"] = 10
    report["amp"] = guarded(lambda: amp_checks(device, tmp, sizes))
    if "error" in report["amp"]:
        report["amp"] = {"error": report["amp"]["error"], "checks": {}, "all_ok": False}


if __name__ == "__main__":
    main()
