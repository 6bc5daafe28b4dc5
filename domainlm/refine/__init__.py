"""Label refinement: the cross-fitted ensemble, the SQLite sentences store and the self-training loop."""
