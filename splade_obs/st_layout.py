"""The sentence-transformers files of a model folder, so ``SparseEncoder(path)`` loads it as trained.

Every model folder the trainer writes (``final/``, ``best/``, each checkpoint's ``model/``) is a Hugging Face
masked-LM folder (``AutoModelForMaskedLM.from_pretrained(path)``) and also holds, as plain JSON written here
without importing sentence-transformers:

* ``modules.json``: module 0 an ``MLMTransformer`` on the folder itself (``path: ""``), module 1 a
  ``SpladePooling`` in ``1_SpladePooling/``. The class paths are the ``sentence_transformers.sparse_encoder.models``
  ones that sentence-transformers 5 wrote and 6 still resolves (without a warning);
* ``1_SpladePooling/config.json``: max pooling of ``log1p(relu(logits))`` (activation ``relu``), the SPLADE
  formula :mod:`splade_obs.model` computes;
* ``sentence_bert_config.json``: the lengths the model was trained at. ``max_seq_length`` is the document length;
  ``query_length`` / ``document_length`` are sentence-transformers 6's per-task lengths, which ``encode_query`` and
  ``encode_document`` apply, so both cut texts where ``splade-obs`` does (``model.max_query_length`` /
  ``model.max_doc_length``). sentence-transformers 5 does not know those two keys and refuses the folder;
* ``config_sentence_transformers.json``: model type ``SparseEncoder``, dot-product similarity, empty
  query/document prompts (splade-obs adds no prefix to either).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: sentence-transformers' class paths; the ``models`` spelling is read by sentence-transformers 5 and 6
MLM_TRANSFORMER = "sentence_transformers.sparse_encoder.models.MLMTransformer"
SPLADE_POOLING = "sentence_transformers.sparse_encoder.models.SpladePooling"
POOLING_DIR = "1_SpladePooling"
ST_CONFIG = "sentence_bert_config.json"
#: what the encoder assumes when neither the run nor the folder it came from says (ModelConfig's defaults)
DEFAULT_LENGTHS = (32, 128)


def st_files(max_query_length: int, max_doc_length: int) -> dict[str, Any]:
    """Relative path -> JSON content of every sentence-transformers file of a model folder."""
    return {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": MLM_TRANSFORMER},
            {"idx": 1, "name": "1", "path": POOLING_DIR, "type": SPLADE_POOLING},
        ],
        ST_CONFIG: {"max_seq_length": int(max_doc_length), "do_lower_case": False,
                    "query_length": int(max_query_length), "document_length": int(max_doc_length)},
        "config_sentence_transformers.json": {"model_type": "SparseEncoder", "prompts": {"query": "", "document": ""},
                                              "default_prompt_name": None, "similarity_fn_name": "dot"},
        f"{POOLING_DIR}/config.json": {"pooling_strategy": "max", "activation_function": "relu",
                                       "embedding_dimension": None},
    }


def write_st_layout(path: str | Path, *, max_query_length: int, max_doc_length: int) -> None:
    """Write the sentence-transformers files into the model folder ``path`` (which exists)."""
    root = Path(path)
    for rel, content in st_files(max_query_length, max_doc_length).items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def trained_lengths(path: str | Path) -> tuple[int, int] | None:
    """``(max_query_length, max_doc_length)`` a model folder was trained at, from its ``sentence_bert_config.json``;
    None when it has none (a folder not written by splade-obs) or it does not say."""
    try:
        cfg = json.loads((Path(path) / ST_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    doc = cfg.get("document_length", cfg.get("max_seq_length"))
    query = cfg.get("query_length")
    if not (isinstance(doc, int) and isinstance(query, int)) or isinstance(doc, bool) or isinstance(query, bool):
        return None
    return query, doc
