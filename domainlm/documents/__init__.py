"""Documents and labels: raw sources, JSONL I/O, validation, the Parquet document schema, splitting
and the label contract."""
