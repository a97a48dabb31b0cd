"""The model card (``README.md``) of a saved model folder, written with ``huggingface_hub``'s ``ModelCard``.

Its YAML metadata is what the Hugging Face Hub reads (library ``sentence-transformers``, the sparse-encoder
tags, base model, datasets, license and, when the run evaluated, the scores in the ``model-index`` format);
its body says how the model was trained (settings, steps, time, hardware), how sparse its vectors are, what
the evaluation measured and how to load it. The same text is the MLflow logged model's description
(:func:`splade_obs.sinks.mlflow.logged_model.description` reads it from the folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .events import metric_name
from .hub import EMBEDDED

TAGS = ["sentence-transformers", "sparse-encoder", "splade", "learned-sparse-retrieval", "splade-obs"]
#: licenses of the models splade-obs ships (Apache-2.0 both); another base model's card says its own
EMBEDDED_LICENSE = "apache-2.0"
README = "README.md"
SPARSITY_KEYS = {"query_nnz": "non-zero terms per query", "doc_nnz": "non-zero terms per document",
                 "retrieval_flops": "expected retrieval FLOPS per query-document pair",
                 "index_size_mb": "index size (MB)"}


@dataclass
class CardFacts:
    """What a card says about one saved model, gathered from what the trainer already knows."""

    kind: str                                   # "final" | "best" | "checkpoint"
    step: int
    epoch: int
    config: TrainConfig
    #: the evaluation's scores (``ndcg@10``, ``query_nnz``... any spelling; made MLflow-valid here)
    eval_scores: dict[str, float] = field(default_factory=dict)
    #: means over the last epoch's steps (``epoch/loss``, ``epoch/query_nnz``...)
    train_means: dict[str, float] = field(default_factory=dict)
    system_info: dict[str, Any] = field(default_factory=dict)
    duration_seconds: float | None = None


def base_model_id(name: str) -> str:
    """The base model as the Hub names it: a hub id as given, an embedded model by its name, a local folder by
    its folder name (a local path says nothing to a reader elsewhere and may name private places)."""
    if name in EMBEDDED:
        return name
    if os.path.isdir(os.path.expanduser(name)):
        return Path(name).expanduser().resolve().name
    return name


def _base_license(name: str) -> str:
    if name in EMBEDDED:
        return EMBEDDED_LICENSE
    folder = Path(name).expanduser()
    try:  # a local base model folder with its own card
        from huggingface_hub import ModelCard

        license_ = ModelCard.load(folder / README).data.license if (folder / README).is_file() else None
    except Exception:  # noqa: BLE001 - no readable card: "other" (the base model's terms apply)
        license_ = None
    return str(license_) if license_ else "other"


def dataset_names(cfg: TrainConfig) -> list[str]:
    """The training and evaluation data by name (their file or folder names; the bundled demo set as such)."""
    names = [Path(cfg.data.train_file).name if cfg.data.train_file else "splade-obs-demo"]
    if cfg.eval.eval_data:
        names.append(Path(cfg.eval.eval_data).resolve().name)
    return list(dict.fromkeys(names))


def split_scores(scores: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(retrieval quality, sparsity) of an evaluation's scores, names made MLflow-valid (``ndcg_at_10``)."""
    quality, sparsity = {}, {}
    for key, value in scores.items():
        name = metric_name(str(key)).removeprefix("eval/")
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if name in SPARSITY_KEYS:
            sparsity[name] = value
        elif "_at_" in name:  # ndcg@10, mrr@10, recall@100...: not the counts and timings
            quality[name] = value
    return quality, sparsity


def eval_results(facts: CardFacts) -> list[Any]:
    """The evaluation's quality scores as ``EvalResult``s (the card's ``model-index``)."""
    from huggingface_hub import EvalResult

    cfg = facts.config
    if not cfg.eval.eval_data:
        return []
    quality, _ = split_scores(facts.eval_scores)
    dataset = Path(cfg.eval.eval_data).resolve().name
    return [EvalResult(task_type="sparse-information-retrieval", task_name="Sparse Information Retrieval",
                       dataset_type=dataset, dataset_name=dataset, dataset_split=cfg.eval.eval_split,
                       metric_type=key, metric_name=key.replace("_at_", "@"), metric_value=value)
            for key, value in sorted(quality.items())]


def build_card(facts: CardFacts) -> Any:
    """The ``huggingface_hub.ModelCard`` of one saved model."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = facts.config
    base = base_model_id(cfg.model.name)
    results = eval_results(facts)
    title = f"SPLADE sparse encoder fine-tuned from {base} with splade-obs ({facts.kind} model)"
    data = ModelCardData(library_name="sentence-transformers", pipeline_tag="feature-extraction", tags=list(TAGS),
                         base_model=base, datasets=dataset_names(cfg), license=_base_license(cfg.model.name),
                         model_name=title, eval_results=results or None)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(facts, title, base)}")


def write_model_card(path: str | Path, facts: CardFacts) -> str:
    """Write ``README.md`` into the model folder ``path``; returns the card's text."""
    text = str(build_card(facts))
    (Path(path) / README).write_text(text, encoding="utf-8")
    return text


# ------------------------------------------------------------------------------------------------ the body
def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|")


def _hardware(info: dict[str, Any]) -> str:
    """GPUs (or the CPU), cores, memory and torch of the machine that trained (no host name)."""
    gpus = info.get("gpu_names") or []
    device = f"{len(gpus)} x {gpus[0]}" if gpus else (info.get("cpu") or "CPU")
    parts = [device, f"{info['cpu_count']} CPU cores" if info.get("cpu_count") else None,
             f"{info['memory_total_gb']} GB memory" if info.get("memory_total_gb") else None,
             f"torch {info['torch_version']}" if info.get("torch_version") else None]
    return ", ".join(str(p) for p in parts if p)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _body(facts: CardFacts, title: str, base: str) -> str:
    from . import __version__

    cfg, m, o, lc = facts.config, facts.config.model, facts.config.optim, facts.config.loss
    quality, eval_sparsity = split_scores(facts.eval_scores)
    training = _table([
        ("base model", base), ("training data", ", ".join(dataset_names(cfg)[:1])),
        ("optimizer steps", facts.step), ("epoch", facts.epoch),
        ("batch size x accumulation", f"{o.batch_size} x {o.gradient_accumulation_steps}"),
        ("learning rate (AdamW, linear warm-up and decay)", o.learning_rate),
        ("FLOPS regularisation (query / document)", f"{lc.lambda_q} / {lc.lambda_d}"),
        ("max length (query / document tokens)", f"{m.max_query_length} / {m.max_doc_length}"),
        ("mixed precision", facts.system_info.get("mixed_precision") or o.mixed_precision), ("seed", o.seed),
        ("training time (this process)", _duration(facts.duration_seconds)),
        ("hardware", _hardware(facts.system_info) or "not recorded"), ("splade-obs", __version__),
    ], ("setting", "value"))
    sparsity_rows = [(f"{SPARSITY_KEYS[k]} (evaluation)", v) for k, v in eval_sparsity.items()]
    sparsity_rows += [(f"{SPARSITY_KEYS[k.split('/', 1)[1]]} (training, last epoch's mean)", v)
                      for k, v in sorted(facts.train_means.items())
                      if k.split("/", 1)[-1] in ("query_nnz", "doc_nnz", "retrieval_flops")]
    sparsity = _table(sparsity_rows, ("figure", "value")) if sparsity_rows else "Not measured."
    if quality:
        evaluation = (f"On `{Path(cfg.eval.eval_data or '').resolve().name}` ({cfg.eval.eval_split} split"
                      f"{f', {cfg.eval.eval_max_queries} queries' if cfg.eval.eval_max_queries else ''}), "
                      f"exact search over the whole corpus:\n\n"
                      + _table([(k.replace("_at_", "@"), v) for k, v in sorted(quality.items())], ("metric", "value")))
    else:
        evaluation = "This run did not evaluate retrieval (train with `--eval-data` to measure it)."
    return f"""# {title}

A [SPLADE](https://arxiv.org/abs/2109.10086) model: every text becomes a sparse vector over the
{base} vocabulary, `w_j = max_t log(1 + relu(logit_t,j))`, and the score of a query and a document is the
dot product of their vectors. Written by splade-obs at optimizer step {facts.step}.

## Training

{training}

## Sparsity

{sparsity}

## Evaluation

{evaluation}

## Usage

With [sentence-transformers](https://www.sbert.net) (6 or newer):

```python
from sentence_transformers import SparseEncoder

model = SparseEncoder("path/to/this/folder")
queries = model.encode_query(["what is splade?"])        # cut at {m.max_query_length} tokens
documents = model.encode_document(["SPLADE is a sparse retriever."])  # cut at {m.max_doc_length} tokens
print(model.similarity(queries, documents))
```

With splade-obs:

```bash
splade-obs encode --model path/to/this/folder --input corpus.jsonl --kind corpus --output vectors.jsonl \\
    --max-length {m.max_doc_length}
splade-obs evaluate --model path/to/this/folder --data path/to/beir-dataset \\
    --max-query-length {m.max_query_length} --max-doc-length {m.max_doc_length}
```

```python
from splade_obs.model import SpladeEncoder

encoder = SpladeEncoder.from_pretrained("path/to/this/folder")
vectors = encoder.encode(["what is splade?"], max_length={m.max_query_length})  # scipy CSR, one row per text
```

The folder is also a Hugging Face masked-LM: `AutoModelForMaskedLM.from_pretrained("path/to/this/folder")`.
"""
