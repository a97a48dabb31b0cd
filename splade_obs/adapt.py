"""Domain adaptation of a SPLADE model by masked-language modelling on the target corpus, before fine-tuning.

A SPLADE model scores with its MLM head, so it knows the words of the domain it was trained on (MS MARCO
for splade-tiny). Masked-LM training on the target corpus (no queries, no labels: only the documents that
will be searched) teaches its transformer layers that domain's vocabulary and phrasing, as domain-adaptive
pre-training does for other encoders. Training the whole model this way undoes SPLADE: the head turns back
into a language model whose log(1+ReLU) activations are dense (on SciFact, 5 epochs took splade-tiny from
nDCG@10 0.637 to 0.081 on dev, with 9,159 non-zeros per document). So by default only the transformer layers
learn (``train_part="layers"``): the embeddings and the MLM head, tied to them, stay SPLADE's. The adapted
model still needs fine-tuning (``splade-obs train``, distillation recipes): on its own it retrieves worse
than before (0.248 on SciFact dev, 4,458 non-zeros per document) until fine-tuning makes it sparse again. On
SciFact with splade-tiny, adaptation (2 epochs, lr 5e-5) followed by the distillation recipe scored the same as
the recipe alone, seed by seed (dev nDCG@10 0.684 / 0.666 / 0.659 against 0.682 / 0.666 / 0.659;
``benchmarks/results/scifact_recipe.json``): no gain there. It is a tool for corpora further from the
model's training domain, to be checked on a dev split like any recipe.

The masking is BERT's (``transformers.DataCollatorForLanguageModeling``: 15% of the non-special tokens,
80% of them replaced by [MASK], 10% by a random token, 10% kept), with a seeded generator per epoch, and
documents are visited in a seeded order per epoch, so a run is reproducible. The loss is computed only at
the masked positions: the vocabulary projection, most of the cost, runs on 15% of the tokens. A fixed
sample of documents with fixed masks gives the masked-LM loss before and after (``mlm_loss_before`` /
``mlm_loss_after``), the measure of what adaptation did. The model is written atomically with
``adapted_from.json``: source model and the sha256 of its weights (null where the source has no
``model.safetensors``: a hub id, ``.bin`` weights), corpus and its digest, settings, the loss per epoch.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_json
from .checkpoint import check_output_dir, staged_dir
from .beir import iter_jsonl_objects, beir_doc_text
from .data import epoch_order
from .errors import ConfigError, DataError, DependencyError, ModelError, TrainingError
from .hub import resolve_model, sha256_file
from .optim import build_optimizer, linear_schedule

log = logging.getLogger("splade_obs.adapt")

#: documents whose masked-LM loss is measured before and after adaptation, and the seed of their masks: the
#: same for every run, so the losses of runs with different settings or seeds compare
PROBE_DOCS = 256
PROBE_SEED = 10_007


@dataclass
class AdaptSettings:
    epochs: int = 2
    learning_rate: float = 5e-5
    batch_size: int = 32
    max_length: int = 256
    mask_probability: float = 0.15
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    train_part: str = "layers"  # "layers": transformer layers only; "all": every weight
    seed: int = 0

    def check(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}", field=name)
        if not 0.0 < self.mask_probability < 1.0:
            raise ConfigError(f"mask_probability must be in (0, 1), got {self.mask_probability}",
                              field="mask_probability")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}", field="learning_rate")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}", field="warmup_ratio")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ConfigError("weight_decay must be >= 0 and max_grad_norm > 0, got "
                              f"{self.weight_decay} and {self.max_grad_norm}", field="weight_decay")
        if self.train_part not in ("layers", "all"):
            raise ConfigError(f"train_part must be 'layers' or 'all', got {self.train_part!r}", field="train_part")


def read_corpus(path: str | Path) -> tuple[list[str], Path]:
    """Document texts ("title text") of a BEIR folder's corpus.jsonl or of a corpus JSONL file in BEIR form
    (one object per line with ``_id``, ``text`` and optionally ``title``); returns them and the file read."""
    p = Path(path)
    corpus = p / "corpus.jsonl" if p.is_dir() else p
    if not corpus.is_file():
        raise DataError("no corpus: expected a BEIR folder with corpus.jsonl or a corpus JSONL file",
                        file_path=str(corpus), hint="pass --corpus BEIR_DIR or --corpus corpus.jsonl")
    texts: list[str] = []
    for line_no, obj in iter_jsonl_objects(corpus, str(corpus)):
        for name in ("title", "text"):
            value = obj.get(name)
            if value is not None and not isinstance(value, str):
                raise DataError(f'field "{name}" is {type(value).__name__} — expected a string',
                                file_path=str(corpus), line_number=line_no, field=name)
        text = beir_doc_text(obj)
        if text:
            texts.append(text)
    if not texts:
        raise DataError("the corpus has no document with text", file_path=str(corpus),
                        hint='give each line a non-empty "text" (and optionally "title")')
    return texts, corpus


def select_trainable(mlm: torch.nn.Module, part: str) -> tuple[int, int]:
    """Set ``requires_grad`` for ``part`` and return (trainable, frozen) parameter counts.

    ``layers``: the parameters of the base model (``mlm.base_model``: BERT, RoBERTa, DistilBERT...) outside its
    ``embeddings`` block; the MLM head, whose decoder is tied to the word embeddings, stays frozen.
    """
    base = getattr(mlm, "base_model", None)
    if part == "all":
        for p in mlm.parameters():
            p.requires_grad_(True)
    else:
        has_base = isinstance(base, torch.nn.Module) and base is not mlm
        names = {id(p): n for n, p in base.named_parameters()} if has_base else {}
        layer_ids = {i for i, n in names.items() if not n.startswith("embeddings.")}
        if not layer_ids or len(layer_ids) == len(names):
            raise ModelError(f"{type(mlm).__name__} has no base model with an 'embeddings' block to keep frozen",
                             hint="use --train-part all for this architecture")
        for p in mlm.parameters():
            p.requires_grad_(id(p) in layer_ids)
    trainable = sum(p.numel() for p in mlm.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in mlm.parameters() if not p.requires_grad)
    return trainable, frozen


def masked_lm_loss(encoder: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy at the masked positions only (the projection runs on those rows alone when the head splits)."""
    labels = batch["labels"]
    picked = labels != -100
    if not bool(picked.any()):
        return torch.zeros((), device=labels.device, requires_grad=True)
    if encoder.fused_head:
        hidden = encoder._head_input(batch["input_ids"], batch["attention_mask"])
        proj = encoder._projection()
        logits = torch.nn.functional.linear(hidden[picked], proj.weight, getattr(proj, "bias", None))
    else:
        logits = encoder.mlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[picked]
    return torch.nn.functional.cross_entropy(logits.float(), labels[picked])


def _collator(tokenizer: Any, settings: AdaptSettings, seed: int) -> Any:
    from transformers import DataCollatorForLanguageModeling

    if "seed" not in inspect.signature(DataCollatorForLanguageModeling).parameters:
        import transformers

        raise DependencyError(f"transformers {transformers.__version__} cannot seed DataCollatorForLanguageModeling, "
                              "so adaptation would not be reproducible", hint="pip install -U 'transformers>=4.51'")
    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=settings.mask_probability, seed=seed)


def _batch(collate: Any, ids: list[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    out = collate([{"input_ids": x} for x in ids])
    return {k: out[k].to(device) for k in ("input_ids", "attention_mask", "labels")}


def probe_batches(tokenizer: Any, ids: list[list[int]], settings: AdaptSettings) -> list[dict[str, torch.Tensor]]:
    """The probe documents masked one by one with the fixed ``PROBE_SEED`` (so the masks depend on neither the
    run's seed nor its batch size), then padded into batches."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = _collator(tokenizer, settings, seed=PROBE_SEED)
    masked = [_batch(collate, [x], torch.device("cpu")) for x in ids]
    batches = []
    for i in range(0, len(masked), settings.batch_size):
        group = masked[i:i + settings.batch_size]
        batches.append({key: torch.nn.utils.rnn.pad_sequence([m[key][0] for m in group], batch_first=True,
                                                             padding_value=fill)
                        for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", -100))})
    return batches


@torch.no_grad()
def probe_loss(encoder: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    """Masked-LM loss over the probe batches (:func:`probe_batches`): comparable before and after, and across runs."""
    was = encoder.training
    encoder.eval()
    total, n = 0.0, 0
    for batch in batches:
        batch = {k: v.to(encoder.device) for k, v in batch.items()}
        k = int((batch["labels"] != -100).sum())
        total += float(masked_lm_loss(encoder, batch)) * k
        n += k
    encoder.train(was)
    return total / max(1, n)


def adapt_model(model: str, corpus: str | Path, output: str | Path, settings: AdaptSettings | None = None, *,
                device: str = "cpu") -> dict[str, Any]:
    """Masked-LM training of ``model`` on ``corpus``, written to ``output``.

    Returns what ``adapted_from.json`` records, plus ``output``: the folder written.
    """
    from .model import SpladeEncoder

    settings = settings or AdaptSettings()
    settings.check()
    target = check_output_dir(output)  # before any work: a bad --output fails now, not after training
    texts, corpus_file = read_corpus(corpus)
    source = Path(resolve_model(model))
    encoder = SpladeEncoder.from_pretrained(model, device=device)
    tok = encoder.tokenizer
    if getattr(tok, "mask_token_id", None) is None:
        raise ModelError("the tokenizer has no mask token, so masked-LM training is impossible", file_path=str(source))
    trainable, frozen = select_trainable(encoder.mlm, settings.train_part)
    ids = tok(texts, truncation=True, max_length=settings.max_length)["input_ids"]
    probe = probe_batches(tok, ids[::max(1, len(ids) // PROBE_DOCS)][:PROBE_DOCS], settings)  # spread over the corpus
    n_probe = sum(len(b["input_ids"]) for b in probe)
    before = probe_loss(encoder, probe)
    log.info("adapting %s on %d documents of %s: %d trainable / %d frozen parameters, masked-LM loss %.3f",
             model, len(ids), corpus_file, trainable, frozen, before)

    params = [p for p in encoder.mlm.parameters() if p.requires_grad]
    optimizer = build_optimizer(encoder.mlm, settings.learning_rate, settings.weight_decay)  # trainable ones only
    per_epoch = math.ceil(len(ids) / settings.batch_size)
    total = settings.epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(int(settings.warmup_ratio * total), total))
    epochs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    # dropout draws from torch's global generator: seed it for this run only, leaving the caller's state as it was
    with torch.random.fork_rng(devices=[encoder.device] if encoder.device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        encoder.train()
        for epoch in range(settings.epochs):
            collate = _collator(tok, settings, seed=settings.seed * 1000 + epoch)
            order = epoch_order(len(ids), settings.seed, epoch)
            loss_sum, started = 0.0, time.perf_counter()
            for b in range(per_epoch):
                batch = _batch(collate, [ids[i] for i in order[b * settings.batch_size:(b + 1) * settings.batch_size]],
                               encoder.device)
                loss = masked_lm_loss(encoder, batch)
                if not torch.isfinite(loss):
                    raise TrainingError(f"masked-LM loss is {float(loss.detach())} at epoch {epoch + 1}, batch {b + 1}",
                                        hint="lower --learning-rate")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += float(loss.detach())
            seconds = time.perf_counter() - started
            epochs.append({"epoch": epoch + 1, "loss": loss_sum / per_epoch, "steps": per_epoch,
                           "seconds": round(seconds, 1), "docs_per_s": round(len(ids) / max(seconds, 1e-9), 1)})
            log.info("adapt epoch %d/%d: masked-LM loss %.3f (%.1f docs/s)", epoch + 1, settings.epochs,
                     epochs[-1]["loss"], epochs[-1]["docs_per_s"])
    after = probe_loss(encoder, probe)
    record = {"model": model, "model_path": str(source),
              "model_weights_sha256": sha256_file(source / "model.safetensors")
              if (source / "model.safetensors").is_file() else None,
              "corpus": str(corpus_file), "corpus_sha256": sha256_file(corpus_file), "documents": len(ids),
              "settings": asdict(settings), "trainable_parameters": trainable, "frozen_parameters": frozen,
              "probe_documents": n_probe, "mlm_loss_before": before, "mlm_loss_after": after, "epochs": epochs,
              "seconds": round(time.perf_counter() - t0, 1)}
    with staged_dir(target) as staging:
        encoder.save_pretrained(staging)
        atomic_write_json(staging / "adapted_from.json", record)
    log.info("masked-LM loss on %d probe documents: %.3f -> %.3f; model written to %s", n_probe, before, after,
             target)
    return {**record, "output": str(target)}
