"""The served classifier: an MLflow ``pyfunc`` model (``mlflow.pyfunc.PythonModel``) around ``models/classifier/model``.

``mlflow models serve -m "models:/domain-lm-classifier@champion" --env-manager local`` serves it offline;
``POST /invocations`` with ``{"dataframe_records": [{"text": "..."}]}`` (or ``dataframe_split``, or
``{"inputs": {"text": [...]}}``) answers ``{"predictions": [{"label", "score", "probabilities"}]}``: the
predicted label, its probability, and every class's probability.

Bad input is refused with ``MlflowException`` ``INVALID_PARAMETER_VALUE``, which MLflow's scoring server turns
into HTTP 400 with the message in the JSON body, and the server goes on answering: a missing ``text`` column, a
value that is not a string, an empty or blank string, a batch over ``max_batch_rows`` rows.
The model is logged as code (:data:`SERVED_MODEL_FILE`, MLflow "models from code"), not pickled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import mlflow.pyfunc

#: The file MLflow logs as the model's code; it calls ``mlflow.models.set_model(TextClassifier())``.
SERVED_MODEL_FILE = Path(__file__).with_name("served_model.py")
#: The artifact key of the classifier folder (``models/classifier/model``).
ARTIFACT_KEY = "classifier"
#: The input example logged with the model (``serving_input_example.json`` beside it shows a request's form).
INPUT_EXAMPLE_TEXT = "셀에 수식을 입력하려면 먼저 등호(=)를 입력하십시오."
#: Serving defaults; the logged ``model_config`` (``classifier.serving`` params) overrides them.
DEFAULT_CONFIG = {"max_batch_rows": 64, "max_length": 256, "max_windows": 1, "batch_size": 16, "torch_threads": None,
                  "dtype": "fp32"}


def invalid_input(message: str):
    """An ``MlflowException`` with ``INVALID_PARAMETER_VALUE``: the scoring server answers it with HTTP 400."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def texts_from_input(model_input: Any, *, max_batch_rows: int) -> list[str]:
    """The texts of a request, checked.

    Args:
        model_input: what the scoring server parsed: a ``pandas.DataFrame`` with a ``text`` column, a dict with a
            ``text`` list, or a list of str.
        max_batch_rows: the most rows one request may hold.

    Returns:
        The texts, in row order.

    Raises:
        MlflowException: (``INVALID_PARAMETER_VALUE``) no ``text`` column; no rows; more than ``max_batch_rows``
            rows; a value that is null, not a string, or empty/blank. The message names the first bad row.
    """
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "text" not in model_input.columns:
            raise invalid_input(f"the input needs a 'text' column; got columns {[str(c) for c in model_input.columns]}. "
                                'Send {"dataframe_records": [{"text": "..."}]}.')
        values = model_input["text"].tolist()
    elif isinstance(model_input, Mapping):
        if "text" not in model_input:
            raise invalid_input(f"the input needs a 'text' field; got {sorted(map(str, model_input))}")
        values = model_input["text"]
        values = [values] if isinstance(values, str) else list(values)
    elif isinstance(model_input, (list, tuple)):
        values = list(model_input)
    else:
        raise invalid_input(f"unsupported input of type {type(model_input).__name__}; send a 'text' column")
    if not values:
        raise invalid_input("the batch has no rows; send at least one text")
    if len(values) > max_batch_rows:
        raise invalid_input(f"the batch has {len(values)} rows, over the limit of {max_batch_rows} rows per request; "
                            "split it into smaller batches")
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and value != value):
            raise invalid_input(f"row {i}: 'text' is missing (null)")
        if not isinstance(value, str):
            raise invalid_input(f"row {i}: 'text' must be a string, got {type(value).__name__} {value!r}"[:300])
        if not value.strip():
            raise invalid_input(f"row {i}: 'text' is empty")
    return values


class TextClassifier(mlflow.pyfunc.PythonModel):
    """The LoRA classifier as a ``pyfunc`` model: loads the ``classifier`` artifact (an HF sequence-classification
    folder) and predicts each text's label and class probabilities."""

    def load_context(self, context) -> None:
        """Load the model, its tokenizer, the serving limits (``context.model_config``) and the compute policy
        (:mod:`domainlm.common.compute`: ``dtype`` as trained, ``auto`` resolved on this machine; ``torch_threads``,
        null = all cores)."""
        from domainlm.classify.model import classes_of, load_classifier
        from domainlm.common.compute import resolve

        self.config = {**DEFAULT_CONFIG, **(getattr(context, "model_config", None) or {})}
        self.compute = resolve({"dtype": self.config.get("dtype") or "fp32", "threads": self.config.get("torch_threads")})
        self.compute.apply()
        self.model, self.tokenizer = load_classifier(context.artifacts[ARTIFACT_KEY])
        self.classes = classes_of(self.model)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        """Classify a batch of texts.

        Returns:
            ``pandas.DataFrame`` with one row per text: ``label`` (str), ``score`` (its probability, float in
            [0, 1]) and ``probabilities`` (``{class: probability}``, summing to 1).

        Raises:
            MlflowException: ``INVALID_PARAMETER_VALUE`` for bad input (:func:`texts_from_input`).
        """
        import pandas as pd

        from domainlm.classify.model import predict_proba

        texts = texts_from_input(model_input, max_batch_rows=int(self.config["max_batch_rows"]))
        proba = predict_proba(self.model, self.tokenizer, texts, max_length=int(self.config["max_length"]),
                              batch_size=int(self.config["batch_size"]), max_windows=int(self.config["max_windows"]),
                              compute=self.compute)
        best = proba.argmax(axis=1)
        return pd.DataFrame({
            "label": [self.classes[j] for j in best],
            "score": [round(float(row[j]), 6) for row, j in zip(proba, best)],
            "probabilities": [{c: round(float(p), 6) for c, p in zip(self.classes, row)} for row in proba],
        })


def input_signature():
    """The model signature: one required string column ``text`` (MLflow checks it before ``predict``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "text")]))
