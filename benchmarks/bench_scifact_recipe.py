"""SciFact fine-tuning recipes for splade-tiny, chosen on a dev split held out of train, then scored on test.

SciFact has no dev split, so picking a recipe by its test score would be fitting the test set. This script
holds ``--dev-queries`` (default 200, seeded) of the 809 train queries out as ``dev``, trains every recipe on
the other train queries, scores it on dev, and only then trains the chosen recipe on the whole train split and
scores it once on test, next to BM25 (bm25s, with and without stemming), zero-shot splade-tiny and the
hybrid teacher. Everything goes through the CLI (``mine-negatives``, ``train``, ``evaluate``), as a user
would run it.

Recipes (all: batch 16, query length 64, document length 256 unless said, no FLOPS; splade-tiny is
already sparse):

* ``in-batch``: contrastive loss over in-batch negatives only, 2 epochs, lr 2e-5 (config 3 of
  ``configs/scifact_finetune.toml``).
* ``distill``: MarginMSE from a hybrid teacher (``mine-negatives --method hybrid --teacher-scores``:
  BM25 + zero-shot SPLADE, 2 negatives per query drawn from the teacher's top 30), no cross-entropy,
  3 epochs, lr 1e-4.
* ``distill-titles``: ``distill`` plus one pseudo-query per corpus document, its title, whose positive is its
  own text (``--title-queries``: no label is read), 1 epoch over the larger set, lr 1e-4.
* ``distill-titles-2ep``, ``distill-titles-3ep``: the same, 2 or 3 epochs.
* ``distill-titles-sentences``: ``distill-titles`` plus each document's last sentence as a pseudo-query
  against the documents stripped of theirs (``--sentence-queries``), 1 epoch.
* ``self-distill``: ``distill-titles-2ep``, then a second round whose teacher fuses stemmed BM25 with the
  round-1 model instead of splade-tiny (``mine-negatives --model <round 1>``), training on from round 1 for
  1 epoch.
* ``distill-better-teacher``: the same teacher as ``self-distill``'s round 2 (stemmed BM25 + the
  ``distill-titles-2ep`` model), but round 2 trains splade-tiny afresh for 2 epochs (``"init": "base"``).
* ``distill-titles-2ep-512``: ``distill-titles-2ep`` trained and scored with documents cut at 512 tokens
  (``"max_doc_length"``; mining still scores at 256).
* ``distill-titles-2ep-kl``: ``distill-titles-2ep`` with listwise KL added to MarginMSE
  (``distillation = "kl_margin_mse"``).
* ``distill-titles-2ep-inbatch``: ``distill-titles-2ep`` plus the in-batch cross-entropy (weight 1; the mined
  negatives stay out of it: ``contrastive_negatives = "in_batch"``).
* ``distill-titles-2ep-kl-lr2e-4``: ``distill-titles-2ep-kl`` at learning rate 2e-4 instead of 1e-4.
* ``distill-titles-2ep-kl-4neg``: ``distill-titles-2ep-kl`` with four negatives per query instead of two.
* ``distill-titles-2ep-kl-lr2e-4-soup3``: ``distill-titles-2ep-kl-lr2e-4`` trained with seeds 42, 1 and 2
  (``"seeds"``), the three averaged weight by weight into one model (``splade-obs average``, a "model soup");
  each seed's model is scored too (``ingredients`` in the row).
* ``adapt-distill-titles-2ep-kl-lr2e-4``: ``splade-obs adapt`` first (``"adapt"``: 2 epochs of masked-LM on the
  corpus, transformer layers only, lr 5e-5; made once and shared, it reads no query or label), then
  ``distill-titles-2ep-kl-lr2e-4`` trained from the adapted model; the teacher is still mined with splade-tiny.
* ``distill-titles-2ep-kl-lr2e-4-idf``: ``distill-titles-2ep-kl-lr2e-4`` trained alike, scored with the index
  weighted by idf^0.4 (``"idf_power"``: ``evaluate --idf-power``, idf from the encoded corpus's document
  frequencies; 0.4 chosen on dev, see ``scratch_probes.index_time_idf_weighting`` in the results); the row
  also carries the same model's metrics without the weighting (``without_idf``).
* ``distill-titles-2ep-kl-lr2e-4-dense``: ``distill-titles-2ep-kl-lr2e-4`` from a teacher that adds a dense
  bi-encoder to the hybrid (``mine-negatives --dense-model all-minilm-l6-v2``, dense weight 0.5, chosen on the
  train queries by ``bench_teacher.py``) and scores the negatives the BM25 + SPLADE teacher draws
  (``--no-dense-candidates``): the README's recipe, mined and trained from scratch.
* ``distill-titles-2ep-kl-lr2e-4-dense-pool``: the same with the dense model's top list in the negative pool
  and the three-way fusion ranking it (``mine-negatives``' default with ``--dense-model``).
  Test runs of these two write elsewhere than the dev-chosen recipe's, e.g. ``--stage test --recipe
  distill-titles-2ep-kl-lr2e-4-dense --output benchmarks/results/scifact_dense_recipe.json``.

A recipe's dev rank is its dev nDCG@10, or the mean over seeds where one recipe was run with several seeds
(``ndcg@10_seed_mean``): one seed of a recipe is one draw, and draws of one recipe differ by ~0.01 on dev.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_scifact_recipe.py                 # dev, then test
    .venv/bin/python benchmarks/bench_scifact_recipe.py --stage dev --recipe in-batch     # one recipe on dev
    .venv/bin/python benchmarks/bench_scifact_recipe.py --stage test --recipe distill-titles

The test stage also compares the recipe with each baseline query by query (``evaluate.paired_comparison``:
mean nDCG@10 difference, 95% bootstrap interval, paired randomisation test p-value), so a gap can be told
from noise; ``--rescore`` scores the model an earlier test run left in ``--workdir`` again without training.

On 2 CPU cores a recipe takes 5-25 minutes on dev (mining 3-5, training 2-15 per round, evaluation 1);
teacher files of first rounds that mine alike are shared. Writes
benchmarks/results/scifact_recipe.json (results of earlier stages are kept and merged). Needs the bench
extra (bm25s, PyStemmer).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

# the benchmarks' shared preamble (repository root on sys.path, paths, table printer, results writer)
from _common import DEFAULT_DATA, KEYS, RESULTS, machine, require_beir, run_cli, table, write_json

COMMON = {"batch_size": 16, "max_query_length": 64, "max_doc_length": 256}
HYBRID = ["--method", "hybrid", "--teacher-scores", "--sample", "--num-negatives", "8", "--depth", "30",
          "--bm25-weight", "0.5"]
DISTILL = {"learning_rate": 1e-4, "num_negatives": 2, "loss": {"distillation": "margin_mse", "contrastive_weight": 0.0}}
# distill-titles-2ep with MarginMSE + listwise KL, the base of the recipes that vary one setting of it
DISTILL_KL = {"mine": [*HYBRID, "--title-queries"], "epochs": 2, **DISTILL,
              "loss": {"distillation": "kl_margin_mse", "contrastive_weight": 0.0}}
RECIPES: dict[str, dict[str, Any]] = {
    "in-batch": {"mine": None, "epochs": 2, "learning_rate": 2e-5, "num_negatives": 0, "loss": {}},
    "distill": {"mine": HYBRID, "epochs": 3, **DISTILL},
    "distill-titles": {"mine": [*HYBRID, "--title-queries"], "epochs": 1, **DISTILL},
    "distill-titles-2ep": {"mine": [*HYBRID, "--title-queries"], "epochs": 2, **DISTILL},
    "distill-titles-3ep": {"mine": [*HYBRID, "--title-queries"], "epochs": 3, **DISTILL},
    "distill-titles-sentences": {"mine": [*HYBRID, "--title-queries", "--sentence-queries"], "epochs": 1, **DISTILL},
    # round 2 mines with the round-1 model (teacher: stemmed BM25 + that model) and trains on from it
    "self-distill": {"mine": [*HYBRID, "--title-queries"], "epochs": 2, **DISTILL,
                     "rounds": [{"mine": [*HYBRID, "--title-queries"], "epochs": 1, **DISTILL}]},
    # the round-1 model only makes the teacher better: round 2 trains splade-tiny afresh from it
    "distill-better-teacher": {"mine": [*HYBRID, "--title-queries"], "epochs": 2, **DISTILL,
                               "rounds": [{"mine": [*HYBRID, "--title-queries"], "epochs": 2, "init": "base",
                                           **DISTILL}]},
    "distill-titles-2ep-512": {"mine": [*HYBRID, "--title-queries"], "epochs": 2, **DISTILL, "max_doc_length": 512},
    "distill-titles-2ep-kl": DISTILL_KL,
    "distill-titles-2ep-inbatch": {"mine": [*HYBRID, "--title-queries"], "epochs": 2, **DISTILL,
                                   "loss": {"distillation": "margin_mse", "contrastive_weight": 1.0,
                                            "contrastive_negatives": "in_batch"}},
    "distill-titles-2ep-kl-lr2e-4": {**DISTILL_KL, "learning_rate": 2e-4},
    "distill-titles-2ep-kl-4neg": {**DISTILL_KL, "num_negatives": 4},
    "distill-titles-2ep-kl-lr2e-4-soup3": {**DISTILL_KL, "learning_rate": 2e-4, "seeds": [42, 1, 2]},
    # splade-obs adapt first: 2 epochs of masked-LM on the corpus, transformer layers only, lr 5e-5
    "adapt-distill-titles-2ep-kl-lr2e-4": {**DISTILL_KL, "learning_rate": 2e-4,
                                           "adapt": ["--epochs", "2", "--learning-rate", "5e-5"]},
    # the same training; the index weighted by idf^0.4 at scoring time (evaluate --idf-power)
    "distill-titles-2ep-kl-lr2e-4-idf": {**DISTILL_KL, "learning_rate": 2e-4, "idf_power": 0.4},
    # the same training from a teacher with a dense bi-encoder in the fusion (dense weight 0.5, the default),
    # negatives drawn by the BM25 + SPLADE fusion (the README's recipe) or from a pool the dense model joins
    "distill-titles-2ep-kl-lr2e-4-dense": {**DISTILL_KL, "learning_rate": 2e-4,
                                           "mine": [*HYBRID, "--title-queries", "--dense-model", "all-minilm-l6-v2",
                                                    "--no-dense-candidates"]},
    "distill-titles-2ep-kl-lr2e-4-dense-pool": {**DISTILL_KL, "learning_rate": 2e-4,
                                                "mine": [*HYBRID, "--title-queries", "--dense-model",
                                                         "all-minilm-l6-v2"]},
}


cli = run_cli  # every step is a CLI command, as a user would run it (the tests swap in an in-process runner)


def dev_split(data: Path, folder: Path, num_dev: int, seed: int) -> Path:
    """A BEIR folder whose qrels/train.tsv lacks ``num_dev`` seeded train queries, held out in qrels/dev.tsv."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        link = folder / name
        if not link.exists():
            link.symlink_to((data / name).resolve())
    lines = (data / "qrels" / "train.tsv").read_text(encoding="utf-8").splitlines()
    head, rows = lines[0], [r for r in lines[1:] if r.strip()]
    qids = sorted({r.split("\t")[0] for r in rows}, key=lambda q: (len(q), q))
    random.Random(seed).shuffle(qids)
    dev = set(qids[:num_dev])
    for name, keep in (("dev", lambda q: q in dev), ("train", lambda q: q not in dev)):
        (folder / "qrels" / f"{name}.tsv").write_text(
            "\n".join([head] + [r for r in rows if keep(r.split("\t")[0])]) + "\n", encoding="utf-8")
    return folder


def doc_length(recipe: dict[str, Any]) -> int:
    """The document length a recipe trains and is scored at (mining always scores at COMMON's)."""
    return int(recipe.get("max_doc_length", COMMON["max_doc_length"]))


def best_on_dev(dev_rows: dict[str, dict[str, Any]]) -> str:
    """The recipe with the best dev nDCG@10 (its mean over seeds where it was run with several): the one the
    test stage scores when none is named."""
    return max(dev_rows, key=lambda name: dev_rows[name].get("ndcg@10_seed_mean", dev_rows[name]["ndcg@10"]))


def write_config(path: Path, recipe: dict[str, Any], model: str = "splade-tiny", seed: int = 42) -> Path:
    loss = {"lambda_q": 0.0, "lambda_d": 0.0, **recipe["loss"]}
    text = ["[model]", f"name = {json.dumps(model)}", f"max_query_length = {COMMON['max_query_length']}",
            f"max_doc_length = {doc_length(recipe)}", "[data]", f"num_negatives = {recipe['num_negatives']}",
            "[optim]", f"epochs = {recipe['epochs']}", f"batch_size = {COMMON['batch_size']}",
            f"learning_rate = {recipe['learning_rate']}", "warmup_ratio = 0.1", "weight_decay = 0.01",
            'mixed_precision = "auto"', f"seed = {seed}", "[loss]"]
    text += [f"{k} = {json.dumps(v)}" for k, v in loss.items()]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def adapted_model(recipe: dict[str, Any], data: Path, work: Path) -> str:
    """The model ``splade-obs adapt`` makes of splade-tiny on ``data``'s corpus with the recipe's ``"adapt"``
    arguments; made once and shared by the recipes that adapt alike (adaptation reads no query or label)."""
    corpus = str((data / "corpus.jsonl").resolve())
    key = hashlib.sha256(json.dumps([corpus, recipe["adapt"]]).encode()).hexdigest()[:12]
    out = work.parent / f"adapted-{key}"
    if not (out / "adapted_from.json").is_file():
        cli("adapt", "--model", "splade-tiny", "--corpus", str(data), "--output", str(out), *recipe["adapt"])
    return str(out)


def train_round(recipe: dict[str, Any], model: str, train_data: Path, work: Path, start: str | None = None) -> Path:
    """Mine with ``model`` (when the round mines) and train from ``start`` when given, else from ``model``, or
    from splade-tiny when the round says ``"init": "base"``; return the trained model folder."""
    work.mkdir(parents=True, exist_ok=True)
    train_file = str(train_data)
    if recipe["mine"]:
        # first rounds that mine alike share the teacher file (mining is deterministic); a later round's
        # model was just trained, so its teacher is always mined afresh
        key = hashlib.sha256(json.dumps([str(train_data), COMMON, recipe["mine"]]).encode()).hexdigest()[:12]
        teacher = work.parent / f"teacher-{key}.jsonl" if model == "splade-tiny" else work / "teacher.jsonl"
        if model != "splade-tiny" or not teacher.is_file():
            cli("mine-negatives", "--model", model, "--data", str(train_data), "--split", "train",
                "--output", str(teacher), "--max-doc-length", str(COMMON["max_doc_length"]), *recipe["mine"])
        train_file = str(teacher)
    init = start or ("splade-tiny" if recipe.get("init") == "base" else model)
    for seed in recipe.get("seeds", [42]):  # one seed: work/run; several: work/seed-N/run each, then their average
        seed_work = work / f"seed-{seed}" if is_soup(recipe) else work
        seed_work.mkdir(parents=True, exist_ok=True)
        out = seed_work / "run"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run every time
        cli("train", "--config", str(write_config(seed_work / "config.toml", recipe, init, seed)),
            "--train-file", train_file, "--output-dir", str(out), "--no-mlflow", "--otel-exporter", "none",
            "--progress", "lines")
    if is_soup(recipe):
        soup(recipe, work)
    return work / "run" / "final"


def is_soup(recipe: dict[str, Any]) -> bool:
    """A round trained with several seeds whose model is their weight average."""
    return len(recipe.get("seeds", [42])) > 1


def seed_models(recipe: dict[str, Any], work: Path) -> dict[int, Path]:
    """The models a several-seed round trained, by seed."""
    return {seed: work / f"seed-{seed}" / "run" / "final" for seed in recipe.get("seeds", [42])}


def soup(recipe: dict[str, Any], work: Path) -> Path:
    """Average the round's seed models weight by weight into ``work/run/final``."""
    target = work / "run" / "final"
    cli("average", *map(str, seed_models(recipe, work).values()), "--output", str(target))
    return target


def run_recipe(name: str, train_data: Path, eval_data: Path, eval_split: str, work: Path,
               train: bool = True) -> dict[str, Any]:
    """Train every round of the recipe on ``train_data``'s train split, then evaluate on ``eval_split``
    (``train=False``: score the model an earlier run of the recipe left in ``work``).

    A recipe's later rounds (``"rounds"``) mine with the model the previous round trained, so their teacher
    fuses BM25 with that model, and train on from it (iterated self-distillation).
    """
    recipe = RECIPES[name]
    start = time.perf_counter()
    model = "splade-tiny"
    stages = [recipe, *recipe.get("rounds", [])]
    for i, stage in enumerate(stages):
        round_work = work if i == 0 else work / f"round{i + 1}"
        if train:
            # a first round with "adapt" mines with splade-tiny (same teacher) and trains the adapted model
            init = adapted_model(stage, train_data, work) if i == 0 and stage.get("adapt") else None
            model = str(train_round(stage, model, train_data, round_work, init))
        else:  # --rescore: the models are there; a several-seed round's average is made again from its seeds
            model = str(soup(stage, round_work) if is_soup(stage) else round_work / "run" / "final")
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"no trained model at {model}: run the recipe without --rescore first")
    trained = time.perf_counter()

    idf_power = float(stages[-1].get("idf_power", 0.0))

    def score(model_dir: Path | str, out: Path, power: float = idf_power) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        tag = eval_split if power == idf_power else f"{eval_split}-idf{power:g}"
        metrics_file, trec = out / f"{tag}_metrics.json", out / f"{tag}.trec"
        cli("evaluate", "--model", str(model_dir), "--data", str(eval_data), "--split", eval_split,
            "--max-query-length", str(COMMON["max_query_length"]), "--max-doc-length", str(doc_length(stages[-1])),
            "--idf-power", str(power), "--output", str(metrics_file), "--trec-run", str(trec))
        metrics = json.loads(metrics_file.read_text())["metrics"]
        return {**{k: metrics[k] for k in KEYS}, "query_nnz": metrics["query_nnz"], "doc_nnz": metrics["doc_nnz"],
                "trec_run": str(trec)}

    row = {"recipe": name, "split": eval_split, **score(model, work)}
    if idf_power:  # the same model without the index weighting, for the paired view
        row["idf_power"] = idf_power
        row["without_idf"] = score(model, work, 0.0)
    row.update({"eval_s": round(time.perf_counter() - trained, 1), "model": model, "settings": recipe})
    last_work = work if len(stages) == 1 else work / f"round{len(stages)}"
    if is_soup(stages[-1]):  # score its ingredients too
        row["ingredients"] = {str(seed): score(path, path.parent.parent)
                              for seed, path in seed_models(stages[-1], last_work).items()}
    if train:
        row["train_s"] = round(trained - start, 1)
    return row


def read_trec_run(path: Path) -> dict[str, dict[str, float]]:
    """``qid Q0 docid rank score tag`` lines back into ``{qid: {docid: -rank}}``: the file's order exactly,
    even where the printed (rounded) scores tie."""
    run: dict[str, dict[str, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        qid, _, doc, rank, *_ = line.split()
        run.setdefault(qid, {})[doc] = -float(rank)
    return run


def baselines(data: Path, split: str) -> list[dict[str, Any]]:
    """BM25 with and without stemming, zero-shot splade-tiny, and the hybrid teacher (BM25 + splade-tiny)."""
    import numpy as np

    from splade_obs.beir import beir_doc_text, load_beir
    from splade_obs.evaluation import compute_metrics, ndcg_per_query
    from splade_obs.mining import RetrieverScores, make_stemmer
    from splade_obs.model import SpladeEncoder

    beir = load_beir(data, split)
    qids = [q for q, rels in beir.qrels.items() if any(r > 0 for r in rels.values()) and q in beir.queries]
    qrels = {q: beir.qrels[q] for q in qids}
    doc_ids = list(beir.corpus)
    texts = [beir_doc_text(beir.corpus[d]) for d in doc_ids]
    queries = [beir.queries[q] for q in qids]
    encoder = SpladeEncoder.from_pretrained("splade-tiny")
    common = {"encoder": encoder, "doc_texts": texts, "query_texts": queries, "max_query_length": 64,
              "max_doc_length": COMMON["max_doc_length"], "batch_size": 32, "amp_dtype": None}
    scorers = {"bm25": RetrieverScores("bm25", **common, stemmer=None),
               "bm25-stem": RetrieverScores("bm25", **common, stemmer=make_stemmer("english")),
               "splade": RetrieverScores("splade", **common, stemmer=None)}

    def score(fn) -> tuple[dict[str, float], dict[str, float]]:  # noqa: ANN001
        run = {}
        for i, q in enumerate(qids):
            row = fn(i)
            top = np.argsort(-row, kind="stable")[:100]
            run[q] = {doc_ids[j]: float(row[j]) for j in top if row[j] > 0}
        return compute_metrics(run, qrels), ndcg_per_query(run, qrels)

    def hybrid(i: int):  # noqa: ANN202  the teacher of the distill recipes: mine-negatives --method hybrid
        b, s = scorers["bm25-stem"].row(i), scorers["splade"].row(i)
        return 0.5 * b / max(b.max(), 1e-9) + 0.5 * s / max(s.max(), 1e-9)

    rows = [("BM25 (bm25s, no stemming)", lambda i: scorers["bm25"].row(i)),
            ("BM25 (bm25s, Snowball stemming)", lambda i: scorers["bm25-stem"].row(i)),
            ("splade-tiny zero-shot", lambda i: scorers["splade"].row(i)),
            ("hybrid teacher (BM25 stemmed + splade-tiny, 0.5/0.5)", hybrid)]
    out = []
    for label, fn in rows:
        metrics, per_query = score(fn)
        out.append({"system": label, "split": split, **{k: v for k, v in metrics.items() if k in KEYS},
                    "ndcg@10_per_query": per_query})
    return out


def significance(row: dict[str, Any], baselines_rows: list[dict[str, Any]], eval_data: Path,
                 split: str) -> dict[str, dict[str, float]]:
    """The recipe's per-query nDCG@10 against each baseline's: mean difference, 95% CI, paired p-value."""
    from splade_obs.beir import load_beir
    from splade_obs.evaluation import ndcg_per_query
    from splade_obs.significance import paired_comparison

    qrels = load_beir(eval_data, split).qrels
    ours = ndcg_per_query(read_trec_run(Path(row["trec_run"])), qrels)
    out = {b["system"]: paired_comparison(ours, b["ndcg@10_per_query"]) for b in baselines_rows}
    if "without_idf" in row:  # what the index weighting alone changes, query by query
        plain = ndcg_per_query(read_trec_run(Path(row["without_idf"]["trec_run"])), qrels)
        out["the same model without idf weighting"] = paired_comparison(ours, plain)
    return out


def rows_table(rows: list[dict[str, Any]]) -> str:
    columns = [("system", f"<{max(len(r['system']) for r in rows) + 2}"), ("split", ">6"),
               *((k, ">12", ".4f") for k in KEYS)]
    return table(columns, ([r["system"], r["split"], *(r[k] for k in KEYS)] for r in rows), rule=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/splade-obs-recipe"))
    ap.add_argument("--stage", choices=["dev", "test", "all"], default="all")
    ap.add_argument("--recipe", action="append", choices=sorted(RECIPES),
                    help="dev stage: recipes to compare (default all); test stage: the recipe to score "
                         "(default: the best on dev)")
    ap.add_argument("--rescore", action="store_true",
                    help="test stage: score the model an earlier test run of the recipe left in --workdir again "
                         "(no training), e.g. to add the significance tests to an older result")
    ap.add_argument("--dev-queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=RESULTS / "scifact_recipe.json")
    args = ap.parse_args()
    require_beir(args.data)
    result: dict[str, Any] = json.loads(args.output.read_text()) if args.output.is_file() else {}
    if (result.get("dev_queries"), result.get("seed")) != (args.dev_queries, args.seed):
        result.pop("dev", None)  # dev rows of another split are not comparable
    result.setdefault("dev", {}).setdefault("recipes", {})
    result.update({"benchmark": "scifact_recipe", "date": dt.datetime.now().isoformat(timespec="seconds"),
                   "machine": machine(), "data": str(args.data), "dev_queries": args.dev_queries,
                   "seed": args.seed, "common": COMMON})

    def save() -> None:  # after every recipe: a crash keeps what the earlier ones measured
        write_json(args.output, result)

    if args.stage in ("dev", "all"):
        folder = dev_split(args.data, args.workdir / "scifact-dev", args.dev_queries, args.seed)
        if "baselines" not in result["dev"]:
            result["dev"]["baselines"] = baselines(folder, "dev")
            save()
        for name in args.recipe or sorted(RECIPES):
            row = run_recipe(name, folder, folder, "dev", args.workdir / "dev" / name)
            result["dev"]["recipes"][name] = row
            save()
        rows = result["dev"]["baselines"] + [{"system": f"recipe {n}", **r} for n, r in result["dev"]["recipes"].items()]
        print(f"SciFact dev ({args.dev_queries} train queries held out, seed {args.seed}); recipes trained on the rest")
        print(rows_table(rows))
    if args.stage in ("test", "all"):
        dev_rows = result["dev"]["recipes"]
        if args.recipe and args.stage == "test":
            name, chosen_by = args.recipe[0], "--recipe"
        elif dev_rows:
            name, chosen_by = best_on_dev(dev_rows), "best dev nDCG@10"
        else:
            raise SystemExit("no dev results to choose from: run --stage dev first or pass --recipe")
        row = run_recipe(name, args.data, args.data, "test", args.workdir / "test" / name, train=not args.rescore)
        if args.rescore and result.get("test", {}).get("chosen") == name:
            row["train_s"] = result["test"]["recipe"].get("train_s")  # the same model: keep its training time
        elif "recipe" in result.get("test", {}):  # an earlier test score is kept, not overwritten
            earlier = result["test"]
            result.setdefault("test_history", []).append({"chosen": earlier["chosen"], "chosen_by": earlier["chosen_by"],
                                                          "date": earlier.get("date"), "recipe": earlier["recipe"]})
        test_baselines = baselines(args.data, "test")
        result["test"] = {"chosen": name, "chosen_by": chosen_by, "date": result["date"],
                          "baselines": test_baselines, "recipe": row,
                          "vs_baselines": significance(row, test_baselines, args.data, "test")}
        save()
        rows = result["test"]["baselines"] + [{"system": f"recipe {name} (trained on all of train)", **row}]
        print(f"SciFact test ({name} chosen by {result['test']['chosen_by']})")
        print(rows_table(rows))
        print("nDCG@10 of the recipe minus each baseline, per query (paired randomisation test, 95% bootstrap CI):")
        for system, cmp in result["test"]["vs_baselines"].items():
            print(f"  vs {system}: {cmp['mean_diff']:+.4f} [{cmp['ci95_low']:+.4f}, {cmp['ci95_high']:+.4f}] "
                  f"p = {cmp['p_value']:.3f}")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
