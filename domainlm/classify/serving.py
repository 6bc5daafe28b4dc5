"""The served classifier: an MLflow ``pyfunc`` model (``mlflow.pyfunc.PythonModel``) around ``models/classifier/model``.

``mlflow models serve -m "models:/domain-lm-classifier@champion" --env-manager local`` serves it offline;
``POST /invocations`` with ``{"inputs": ["text", ...]}`` answers ``{"predictions": [{"label", "score",
"probabilities"}]}``: the predicted label, its probability, and every class's probability.

The input is declared as it is: ``predict``'s type hint ``list[str]`` is the model signature (MLflow infers
``[string (required)]`` from it). With a type-hint signature MLflow's scoring server hands the request's
``inputs`` list to the model as sent; with a column signature (``ColSpec("string", "text")``) its parser
(``mlflow.utils.proto_json_utils._cast_schema_type``) runs ``numpy.array(values, dtype=str)`` on the
``inputs`` form first, so ``12345`` would arrive as ``"12345"`` and ``null`` as ``"None"`` and get a label with
HTTP 200. With the type hint, MLflow checks every element against ``str`` and refuses a number, ``null``, ``NaN``,
a boolean, a list or an object with HTTP 400, naming the offending value and its type; the DataFrame forms
(``dataframe_records``, ``dataframe_split``) are refused with 400 too, since a type-hint model takes
``inputs`` only. From Python, ``model.predict(pandas.DataFrame({"text": [...]}))`` still works (MLflow turns a
one-column frame into a list).

:func:`texts_from_input` then refuses, with HTTP 400 and the row named: no rows; more than
``max_batch_rows`` rows; a text empty after stripping; a text over ``max_text_chars`` characters (refused,
never truncated silently: the model's own cut at ``max_length`` tokens is the only truncation); more than
``max_request_bytes`` bytes of text (UTF-8) in one request. ``MlflowException`` ``INVALID_PARAMETER_VALUE``
becomes HTTP 400 with the message in the JSON body, and the server goes on answering. The byte limit is
checked on the parsed texts: uvicorn (which ``mlflow models serve`` runs) has no request-body limit, so a
hard cap on the wire belongs in a reverse proxy in front (nginx ``client_max_body_size``).

The model is logged as code (:data:`SERVED_MODEL_FILE`, MLflow "models from code"), not pickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc

#: The file MLflow logs as the model's code; it calls ``mlflow.models.set_model(TextClassifier())``.
SERVED_MODEL_FILE = Path(__file__).with_name("served_model.py")
#: The artifact key of the classifier folder (``models/classifier/model``).
ARTIFACT_KEY = "classifier"
#: The input example logged with the model (``serving_input_example.json`` beside it shows a request's form).
INPUT_EXAMPLE_TEXT = "셀에 수식을 입력하려면 먼저 등호(=)를 입력하십시오."
#: Serving defaults; the logged ``model_config`` (``classifier.serving`` params) overrides them.
#: ``max_text_chars``: characters per text, = ``validate.max_chars`` (every document the pipeline keeps can be
#: served); ``max_request_bytes``: UTF-8 bytes of all texts of one request (2 MiB: a batch of 64 texts of
#: 10,000 Hangul syllables, 3 bytes each, just fits).
DEFAULT_CONFIG = {
    "max_batch_rows": 64,
    "max_length": 256,
    "max_windows": 1,
    "batch_size": 16,
    "torch_threads": None,
    "dtype": "fp32",
    "max_text_chars": 200_000,
    "max_request_bytes": 2 << 20,
}


def invalid_input(message: str):
    """An ``MlflowException`` with ``INVALID_PARAMETER_VALUE``: the scoring server answers it with HTTP 400."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def texts_from_input(
    model_input: Sequence[Any],
    *,
    max_batch_rows: int,
    max_text_chars: int | None = None,
    max_request_bytes: int | None = None,
) -> list[str]:
    """The texts of a request, checked.

    Args:
        model_input: the request's rows (a list; MLflow has already checked that each is a ``str`` when the
            call came through the type-hinted ``predict``; they are checked again here).
        max_batch_rows: the most rows one request may hold.
        max_text_chars: the most characters one text may hold (``None``: no limit).
        max_request_bytes: the most UTF-8 bytes all texts of one request may hold together (``None``: no limit).

    Returns:
        The texts, in row order, unchanged.

    Raises:
        MlflowException: (``INVALID_PARAMETER_VALUE``, HTTP 400) the input is not a list; no rows; more than
            ``max_batch_rows`` rows; a row that is not a string (null, NaN, a number, a boolean, a list, an
            object); a text that is empty after stripping or longer than ``max_text_chars``; more than
            ``max_request_bytes`` bytes in all. The message names the first bad row (``row <i>``, 0-based).
    """
    if isinstance(model_input, (str, bytes)) or not isinstance(model_input, Sequence):
        raise invalid_input(
            f'the input must be a list of texts, got {type(model_input).__name__}; send {{"inputs": ["text", ...]}}'
        )
    values = list(model_input)
    if not values:
        raise invalid_input("the batch has no rows; send at least one text")
    if len(values) > max_batch_rows:
        raise invalid_input(
            f"the batch has {len(values)} rows, over the limit of {max_batch_rows} rows per request; "
            "split it into smaller batches"
        )
    total_bytes = 0
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and value != value):
            raise invalid_input(f"row {i}: the text is missing ({'NaN' if value is not None else 'null'})")
        if not isinstance(value, str):
            raise invalid_input(f"row {i}: the text must be a string, got {type(value).__name__} {value!r}"[:300])
        if not value.strip():
            raise invalid_input(f"row {i}: the text is empty")
        if max_text_chars is not None and len(value) > max_text_chars:
            raise invalid_input(
                f"row {i}: the text has {len(value)} characters, over the limit of {max_text_chars} "
                "characters per text; split the document"
            )
        total_bytes += len(value.encode("utf-8"))
        if max_request_bytes is not None and total_bytes > max_request_bytes:
            raise invalid_input(
                f"row {i}: the request's texts pass {max_request_bytes} bytes (UTF-8), the limit per "
                "request; split it into smaller batches"
            )
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
        self.compute = resolve(
            {"dtype": self.config.get("dtype") or "fp32", "threads": self.config.get("torch_threads")}
        )
        self.compute.apply()
        self.model, self.tokenizer = load_classifier(context.artifacts[ARTIFACT_KEY])
        self.classes = classes_of(self.model)

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None):
        """Classify a batch of texts.

        Args:
            model_input: the texts (the type hint is the model signature: MLflow refuses a non-string element
                before this runs).

        Returns:
            ``pandas.DataFrame`` with one row per text: ``label`` (str), ``score`` (its probability, float in
            [0, 1]) and ``probabilities`` (``{class: probability}``, summing to 1).

        Raises:
            MlflowException: ``INVALID_PARAMETER_VALUE`` for bad input (:func:`texts_from_input`).
        """
        import pandas as pd

        from domainlm.classify.model import predict_proba

        limit = self.config.get
        texts = texts_from_input(
            model_input,
            max_batch_rows=int(limit("max_batch_rows")),
            max_text_chars=_int_or_none(limit("max_text_chars")),
            max_request_bytes=_int_or_none(limit("max_request_bytes")),
        )
        proba = predict_proba(
            self.model,
            self.tokenizer,
            texts,
            max_length=int(self.config["max_length"]),
            batch_size=int(self.config["batch_size"]),
            max_windows=int(self.config["max_windows"]),
            compute=self.compute,
        )
        best = proba.argmax(axis=1)
        return pd.DataFrame(
            {
                "label": [self.classes[j] for j in best],
                "score": [round(float(row[j]), 6) for row, j in zip(proba, best)],
                "probabilities": [{c: round(float(p), 6) for c, p in zip(self.classes, row)} for row in proba],
            }
        )


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)
