"""Legacy: the pickled pyfunc wrapper of the models that earlier versions of splade-obs logged as the run
artifact ``splade_model`` (``runs:/<run_id>/splade_model``).

New runs log their models as MLflow 3 LoggedModels from code (``model_code.py``, ``logged_model.py``), which
load without splade_obs. This class stays only so that ``mlflow.pyfunc.load_model`` can still unpickle the
models already logged: their pickle names ``splade_obs.sinks.mlflow.pyfunc.SpladePyfuncModel``.

Importing this module does not import mlflow: ``SpladePyfuncModel`` (a subclass of
``mlflow.pyfunc.PythonModel``) is built on first access through the module ``__getattr__``. Its
``__module__`` is this module, so the pickle MLflow wrote (cloudpickle, by reference) finds it again here.
"""

from __future__ import annotations

from typing import Any

_pyfunc_class: type | None = None


def _build_pyfunc_class() -> type:
    import mlflow.pyfunc

    class SpladePyfuncModel(mlflow.pyfunc.PythonModel):
        """``predict(texts)`` -> one ``{term: weight}`` dict per text, heaviest term first.

        Input: a list of strings, a string, a pandas Series, or a DataFrame (column ``text``, ``query``
        or the first column). The HF folder travels as the artifact ``hf``; loading needs torch,
        transformers and splade-obs installed.
        """

        def __init__(self, max_length: int = 128, top_k: int | None = None) -> None:
            self.max_length = max_length
            self.top_k = top_k
            self._encoder: Any = None

        def load_context(self, context: Any) -> None:
            from splade_obs.model import SpladeEncoder
            self._encoder = SpladeEncoder.from_pretrained(context.artifacts["hf"])

        def predict(self, context, model_input, params=None):  # noqa: ANN001,ANN201 - pyfunc signature
            from splade_obs.model import sparse_to_dict
            texts = _texts_from(model_input)
            max_length = int((params or {}).get("max_length", self.max_length))
            top_k = (params or {}).get("top_k", self.top_k)
            matrix = self._encoder.encode(texts, max_length=max_length, top_k=top_k)
            return [sparse_to_dict(matrix[i], self._encoder.tokenizer) for i in range(len(texts))]

    SpladePyfuncModel.__module__ = __name__
    SpladePyfuncModel.__qualname__ = "SpladePyfuncModel"
    return SpladePyfuncModel


def _texts_from(model_input: Any) -> list[str]:
    """Normalize the inputs pyfunc callers pass (list, str, Series, DataFrame, numpy array)."""
    if isinstance(model_input, str):
        return [model_input]
    columns = getattr(model_input, "columns", None)
    if columns is not None:  # DataFrame
        col = next((c for c in ("text", "query", "document") if c in columns), columns[0])
        return [str(t) for t in model_input[col].tolist()]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    return [str(t) for t in model_input]


def __getattr__(name: str) -> Any:
    """``SpladePyfuncModel`` is built on first access so importing this module stays mlflow-free.

    Pickles (cloudpickle, as MLflow writes them) refer to it by module and name, which resolves here.
    """
    global _pyfunc_class
    if name == "SpladePyfuncModel":
        if _pyfunc_class is None:
            _pyfunc_class = _build_pyfunc_class()
        return _pyfunc_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
