"""MLflow tracking for the model stages: one run per DVC stage, tagged with git commit and stage.

The tracking URI defaults to ``sqlite:///mlflow.db`` in the repository root (git-ignored);
``MLFLOW_TRACKING_URI`` overrides it. ``mlflow ui --backend-store-uri sqlite:///mlflow.db``
shows the runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from domainlm.common.metrics import flatten
from domainlm.common.stage import git_commit

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT = "domain-lm"


def tracking_uri() -> str:
    """The MLflow tracking URI in force: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


@contextlib.contextmanager
def mlflow_run(
    stage: str, params: dict[str, Any] | None = None, *, nested: bool = False, run_name: str | None = None
) -> Iterator[Any]:
    """Open an MLflow run for a DVC stage and yield the ``mlflow`` module.

    Tags: ``dvc.stage`` = ``stage``, ``git.commit`` = HEAD. ``params`` are flattened with
    ``.``-joined keys and logged (values stringified by MLflow, 6000 chars max each).
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=run_name or stage, nested=nested):
        mlflow.set_tags({"dvc.stage": stage, "git.commit": git_commit()})
        if params:
            mlflow.log_params(flatten(params))
        yield mlflow


def ensure_registered_model(client: Any, name: str, description: str) -> None:
    """Create the MLflow registered model ``name`` unless it exists (``client``: an ``MlflowClient``).

    Raises:
        mlflow.exceptions.MlflowException: on any registry error other than the model not existing yet.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description=description)
