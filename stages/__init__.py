"""DVC pipeline stages for building domain language models.

Each stage is one module run as ``python -m stages.<name>``; it reads its own section of
``params.yaml`` and writes exactly the outs that ``dvc.yaml`` declares. Modules that several
stages share are named for what they hold: :mod:`stages.params`, :mod:`stages.atomic`,
:mod:`stages.jsonl`, :mod:`stages.metrics`, :mod:`stages.hangul`.
"""
