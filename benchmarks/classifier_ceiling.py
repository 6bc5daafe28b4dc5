"""Where the LoRA classifier's test macro-F1 levels off: train_classifier's gate attempts under other settings.

Runs the stage's own code (``domainlm.classify.training.train_attempt``, ``gate.attempt_settings``,
``model.predict_proba``) on this checkout's ``data/split``, ``data/labels/split_labels.parquet`` and
``models/merged`` (run ``dvc repro refine_labels`` first), with ``classifier`` params overridden per run, and appends
one row per attempt to ``benchmarks/results/classifier_ceiling.jsonl``: val and test macro-F1 (test on source
labels, as the gate scores it), epochs, seconds. After each row it rewrites the file's ``.meta.json`` sidecar
(hardware, commit, date): the sidecar describes the latest run.

    python benchmarks/classifier_ceiling.py NAME '{"windows": {"train": 8, "predict": 8}}' [MAX_RETRIES]

``{"cap": N}`` in the overrides trains each epoch on at most N documents per class (a class-balanced draw per epoch).
Measured on an idle 2-core AVX512-BF16 machine, bf16 on 2 threads: see the Benchmarks page of the documentation
(docs/, `make docs`).
"""

import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
logging.basicConfig(level=logging.WARNING)
import tempfile  # noqa: E402

from measure import deep_update, gate_attempts, write_meta  # noqa: E402

from domainlm.classify.data import class_list, read_splits  # noqa: E402
from domainlm.common import params as P  # noqa: E402
from domainlm.common.compute import resolve  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "classifier_ceiling.jsonl"
WORK = Path(tempfile.mkdtemp(prefix="classifier_ceiling_"))
name, over = sys.argv[1], json.loads(sys.argv[2])
CAP = over.pop("cap", None)
if CAP:  # a class-balanced draw: each epoch trains on at most CAP documents per class
    import numpy as np

    import domainlm.classify.training as T

    class CappedWindowDataset(T.WindowSampledDataset):
        def __init__(self, windows, labels, *, seed):
            super().__init__(windows, labels, seed=seed)
            self.by_class = {}
            for i, y in enumerate(self.labels):
                self.by_class.setdefault(y, []).append(i)
            self.n = sum(min(len(v), CAP) for v in self.by_class.values())
            self._drawn_epoch, self._docs = None, []

        def __len__(self):
            return self.n

        def _epoch_docs(self):
            if self._drawn_epoch != self.epoch:
                rng = np.random.default_rng([self.seed, self.epoch, 7])
                self._docs = [
                    docs[j]
                    for y in sorted(self.by_class)
                    for docs in [self.by_class[y]]
                    for j in rng.permutation(len(docs))[:CAP]
                ]
                self._drawn_epoch = self.epoch
            return self._docs

        def __getitem__(self, i):
            d = self._epoch_docs()[i]
            return {"input_ids": self.windows[d][self.window_index(d)], "labels": self.labels[d]}

    T.WindowSampledDataset = CappedWindowDataset  # train_attempt builds its train dataset from this name
retries = int(sys.argv[3]) if len(sys.argv) > 3 else 3
prm = P.load_params()
cfg = deep_update(copy.deepcopy(prm["classifier"]), over)
compute = resolve(prm.get("compute"))
compute.apply()
splits = read_splits("data/split", "data/labels/split_labels.parquet", prm["domains"])
classes = class_list(splits["train"])
t0 = time.perf_counter()
for at in gate_attempts(cfg, splits, classes, compute, WORK / name, retries):
    info = at["info"]
    r = dict(
        name=name,
        attempt=at["attempt"],
        val=round(info["val_macro_f1"], 4),
        test=round(at["test_macro_f1"], 4),
        epochs_run=info["epochs_run"],
        best_epoch=info["best_epoch"],
        train_s=round(info["train_s"], 1),
        predict_s=round(at["predict_save_s"], 1),
        attempt_s=round(at["train_s"] + at["predict_save_s"], 1),
        cum_s=round(time.perf_counter() - t0, 1),
    )
    print(json.dumps(r), flush=True)
    with open(OUT, "a") as f:
        f.write(json.dumps({**r, "over": {**over, **({"cap": CAP} if CAP else {})}}) + "\n")
    write_meta(OUT)
