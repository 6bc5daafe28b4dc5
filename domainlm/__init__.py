"""domainlm: the shared code of the domain-LM pipeline (the DVC entry points live in ``stages/``).

Sub-packages, one per concern:

- :mod:`domainlm.common`: params, paths, atomic writes, metrics, MLflow tracking, thread limits
  and the stage contract (logging, wall time, peak RSS, run and error logs).
- :mod:`domainlm.documents`: raw sources, JSONL I/O, validation, the Parquet document schema,
  stratified splitting and the label contract (overrides and the label table).
- :mod:`domainlm.korean`: Hangul normalization, jamo decomposition and shingling.
- :mod:`domainlm.dedup`: exact + MinHash-LSH near-duplicate removal.
- :mod:`domainlm.lm`: language-model data, pre-training, LoRA, task vectors, merging and evaluation.
- :mod:`domainlm.refine`: the label-refinement ensemble, the SQLite ``sentences`` store and the
  self-training loop.

:mod:`domainlm.cli` is the ``domainlm`` command: the stages' entry points, the daily round, the model server, the
label overrides, the reproducibility check and the benchmarks, each with ``--help``.
"""

__version__ = "0.9.0"
