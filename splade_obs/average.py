"""Weight averaging ("model soup", Wortsman et al. 2022) of SPLADE models fine-tuned from one starting point.

Models trained from the same initial weights with different seeds (data order, negatives drawn) usually sit
in one basin of the loss, so the average of their weights is itself a good model, often better than each of
them, at the cost of one model at inference. The models must share the architecture (``config.json`` apart
from bookkeeping keys) and the tokenizer (``tokenizer.json`` apart from its truncation and padding settings); their weights are read from
``model.safetensors`` and averaged in float64, integer buffers must be equal. The result is written
atomically: a folder that loads like any other model, with ``averaged_from.json`` naming the inputs, their
weights and the sha256 of each input's weights file.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Sequence

import torch

from .atomic import atomic_write_json
from .checkpoint import check_output_dir, staged_dir
from .errors import ConfigError, ModelError
from .hub import resolve_model, sha256_file

WEIGHTS = "model.safetensors"
#: config.json keys that say where a model came from, not what it is
BOOKKEEPING = {"_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path.name}: {exc}", file_path=str(path),
                         hint="pass model folders written by `splade-obs train` or save_pretrained") from exc


def _config(folder: Path) -> dict:
    """config.json without its bookkeeping: what makes the architecture."""
    return {k: v for k, v in _read_json(folder / "config.json").items() if k not in BOOKKEEPING}


def _vocabulary(folder: Path) -> dict | None:
    """tokenizer.json without its runtime settings (truncation, padding): what maps text to token ids."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    return {k: v for k, v in _read_json(path).items() if k not in ("truncation", "padding")}


def average_models(models: Sequence[str], output: str | Path, weights: Sequence[float] | None = None) -> dict:
    """Average the weights of ``models`` (local folders or ``splade-tiny``) into ``output``.

    ``weights`` (default: uniform) are normalised to sum to 1. Returns what ``averaged_from.json`` records,
    plus ``output``: the folder written.
    """
    from safetensors.torch import load_file, save_file

    if len(models) < 2:
        raise ConfigError("averaging needs at least two models", field="models", hint="pass two or more model folders")
    if weights is None:
        weights = [1.0] * len(models)
    if len(weights) != len(models):
        raise ConfigError(f"{len(weights)} weights for {len(models)} models", field="weights",
                          hint="give one --weight per model, or none for a uniform average")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:  # a NaN would make a NaN model
        raise ConfigError(f"weights must be finite and non-negative with a positive sum, got {list(weights)}",
                          field="weights", hint="give one --weight per model, e.g. --weight 2 --weight 1")
    mix = [float(w) / float(sum(weights)) for w in weights]
    target = check_output_dir(output)
    folders = [Path(resolve_model(m)) for m in models]
    first = folders[0]
    base_cfg = _config(first)
    tok = _vocabulary(first)
    states = []
    for folder in folders:
        if not (folder / WEIGHTS).is_file():
            raise ModelError(f"no {WEIGHTS} in the model folder", file_path=str(folder),
                             hint="averaging reads single-file safetensors weights, as `splade-obs train` writes")
        if _config(folder) != base_cfg:
            raise ModelError("config.json differs from the first model's: not the same architecture",
                             file_path=str(folder / "config.json"), hint="average models fine-tuned from one start")
        if _vocabulary(folder) != tok:
            raise ModelError("tokenizer.json differs from the first model's", file_path=str(folder / "tokenizer.json"),
                             hint="average models that share one tokenizer")
        states.append(load_file(str(folder / WEIGHTS)))
    keys = list(states[0])
    averaged: dict[str, torch.Tensor] = {}
    for folder, state in zip(folders[1:], states[1:]):
        if set(state) != set(keys):
            missing = sorted(set(keys) ^ set(state))[:3]
            raise ModelError(f"weights differ in their tensors (e.g. {', '.join(missing)})",
                             file_path=str(folder / WEIGHTS), hint="average models of one architecture")
    for key in keys:
        tensors = [s[key] for s in states]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise ModelError(f"tensor {key} has different shapes", file_path=str(folders[0] / WEIGHTS))
        if tensors[0].is_floating_point():
            acc = sum(w * t.to(torch.float64) for w, t in zip(mix, tensors))
            averaged[key] = acc.to(tensors[0].dtype).contiguous()
        else:  # integer buffers (position ids): must agree
            if any(not torch.equal(t, tensors[0]) for t in tensors):
                raise ModelError(f"integer tensor {key} differs between models", file_path=str(folders[0] / WEIGHTS))
            averaged[key] = tensors[0].clone()
    with staged_dir(target) as staging:
        for f in first.iterdir():
            if f.is_file() and f.name != WEIGHTS and not f.name.startswith("."):
                shutil.copy2(f, staging / f.name)
        save_file(averaged, str(staging / WEIGHTS), metadata={"format": "pt"})
        record = {"method": "uniform" if len(set(mix)) == 1 else "weighted",
                  "models": [{"model": m, "path": str(f), "weight": w, "weights_sha256": sha256_file(f / WEIGHTS)}
                             for m, f, w in zip(models, folders, mix)]}
        atomic_write_json(staging / "averaged_from.json", record)
    return {**record, "output": str(target)}
