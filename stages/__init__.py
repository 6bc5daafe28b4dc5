"""DVC pipeline stages for building domain language models.

Each stage is one module run as ``python -m stages.<name>``; it reads its own section of
``params.yaml`` and writes exactly the outs that ``dvc.yaml`` declares. Modules that several
stages share are named for what they hold: :mod:`domainlm.common.params`, :mod:`domainlm.common.atomic`,
:mod:`domainlm.documents.jsonl`, :mod:`domainlm.common.metrics`, :mod:`domainlm.korean.hangul`.
"""
