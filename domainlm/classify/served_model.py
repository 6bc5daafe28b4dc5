"""The code MLflow logs as the classifier's pyfunc model ("models from code"): loading the model runs this file,
which hands MLflow a :class:`domainlm.classify.serving.TextClassifier`. Imported by nothing else."""

import mlflow.models

from domainlm.classify.serving import TextClassifier

mlflow.models.set_model(TextClassifier())
