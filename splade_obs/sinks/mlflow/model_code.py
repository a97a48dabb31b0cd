"""The SPLADE encoder as an MLflow "model from code": the file MLflow copies into every logged model.

Self-contained on purpose: it imports only mlflow, torch, transformers, numpy and pandas, never splade_obs,
so ``mlflow.pyfunc.load_model("models:/<model_id>")`` works wherever the model's logged requirements are
installed. MLflow runs this file (``mlflow.models.set_model`` below) when the model is saved and again
when it is loaded; it is not meant to be imported as a module of splade_obs.

``predict(texts)`` -> one ``{term: weight}`` dict per text, heaviest term first, zero weights left out:
``w_j = max_t log(1 + relu(logit_{t,j}))`` over the non-padding tokens ``t`` of the text (truncated to
``max_length`` tokens), the same weights as ``splade_obs.model.SpladeEncoder.encode`` (which computes them
with a fused head; both agree to float32 rounding). ``top_k`` keeps the k heaviest terms of each text.

* input: a list of strings, one string, a pandas Series, a DataFrame (column ``text``, else ``query`` or
  ``document``, else the first column) or a dict ``{"text": [...]}``;
* params (per call; None or absent: the model config's value): ``max_length`` (tokens), ``top_k``;
* model config (``model_config=`` when logging or loading): ``max_length`` (default 128), ``top_k``
  (None: every term), ``batch_size`` (texts per forward pass, default 8) and ``device`` (default ``"cpu"``;
  e.g. ``"cuda"``);
* artifact ``hf``: the Hugging Face folder (masked-LM weights, config, tokenizer).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

TEXT_COLUMNS = ("text", "query", "document")
DEFAULT_MAX_LENGTH = 128
DEFAULT_BATCH_SIZE = 8


def texts_from(model_input: Any) -> list[str]:
    """Normalise what pyfunc callers pass (list, str, Series, DataFrame, dict, numpy array) to a list of str."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        key = next((c for c in TEXT_COLUMNS if c in model_input), next(iter(model_input), None))
        model_input = model_input.get(key, []) if key is not None else []
        if isinstance(model_input, str):
            return [model_input]
    columns = getattr(model_input, "columns", None)
    if columns is not None:  # a DataFrame
        if len(columns) == 0:
            return []
        col = next((c for c in TEXT_COLUMNS if c in columns), columns[0])
        model_input = model_input[col]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    texts: list[str] = []
    for item in model_input:  # {"text": [...]} through the signature: one cell holding the whole list
        if hasattr(item, "tolist") and not isinstance(item, str):
            item = item.tolist()
        if isinstance(item, (list, tuple)):
            texts.extend(str(t) for t in item)
        else:
            texts.append(str(item))
    return texts


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


class SpladeSparseEncoder(PythonModel):
    """Texts in, sparse SPLADE term weights out (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        config = dict(context.model_config or {})
        self.max_length = int(config.get("max_length") or DEFAULT_MAX_LENGTH)
        self.top_k = _optional_int(config.get("top_k"))
        self.batch_size = max(1, int(config.get("batch_size") or DEFAULT_BATCH_SIZE))
        self.device = torch.device(config.get("device") or "cpu")
        path = context.artifacts["hf"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.mlm = AutoModelForMaskedLM.from_pretrained(path).to(self.device).eval()

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> list[dict[str, float]]:
        """One ``{term: weight}`` map per text. Loaded through pyfunc, ``model_input`` is the DataFrame the
        logged signature makes of what the caller passed; called directly, any shape ``texts_from`` knows.
        (A DataFrame hint also tells MLflow to keep the explicit signature rather than infer one.)"""
        params = params or {}
        max_length = int(params.get("max_length") or self.max_length)
        top_k = self.top_k if params.get("top_k") is None else int(params["top_k"])
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None for every term), got {top_k}")
        texts = texts_from(model_input)
        out: list[dict[str, float]] = []
        for start in range(0, len(texts), self.batch_size):
            out.extend(self._encode(texts[start:start + self.batch_size], max_length, top_k))
        return out

    def _encode(self, texts: list[str], max_length: int, top_k: int | None) -> list[dict[str, float]]:
        import numpy as np
        import torch

        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                             return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        with torch.inference_mode():
            logits = self.mlm(input_ids=ids, attention_mask=mask).logits.float()        # (B, L, V)
            weights = torch.log1p(torch.relu(logits)).masked_fill(~mask.bool().unsqueeze(-1), 0.0).amax(dim=1)
            if top_k is not None and top_k < weights.shape[-1]:
                values, index = weights.topk(top_k, dim=-1)
                weights = torch.zeros_like(weights).scatter_(-1, index, values)
        weights = weights.cpu().numpy()
        rows = []
        for row in weights:
            term_ids = np.flatnonzero(row)
            term_ids = term_ids[np.argsort(-row[term_ids], kind="stable")]
            terms = self.tokenizer.convert_ids_to_tokens([int(i) for i in term_ids])
            rows.append({term: float(row[i]) for term, i in zip(terms, term_ids)})
        return rows


mlflow.models.set_model(SpladeSparseEncoder())
