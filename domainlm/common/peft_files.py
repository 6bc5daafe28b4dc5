"""Files that peft writes, made byte-stable for DVC: shared by train_lora's experts and train_classifier's adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path


def sort_adapter_config(path: str | os.PathLike) -> None:
    """Rewrite a peft ``adapter_config.json`` with its set-valued lists sorted.

    peft keeps ``target_modules`` (and ``modules_to_save``) as Python sets and writes them in set
    order, which follows the per-process string-hash seed (``PYTHONHASHSEED``): the same adapter came
    out with a different file, and so a different DVC hash, on every run. Sorting makes the file a
    pure function of the config; peft reads the lists back as sets, so loading is unchanged.
    Formatting follows peft's own writer (``json.dumps(..., indent=2, sort_keys=True)``).
    """
    path = Path(path)
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
