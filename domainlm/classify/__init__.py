"""The downstream document classifier (stage ``train_classifier``): a LoRA sequence classifier on the merged LM,
its TF-IDF baseline, the macro-F1 gate with bounded retries, alerts, the registry entry and the served model.

The label set is the label table's ``label`` column over all domains (:mod:`domainlm.classify.data`), the
same label space ``refine_labels`` refines: office_help's help modules (calc, writer, impress, draw, math,
chart, basic, database, shared) and the single-label domains (law, bill, faq).
"""
