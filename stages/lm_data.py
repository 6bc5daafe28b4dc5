"""lm_data: the documents the LM stages read: the LM release's frozen split (``data/release``, cut by
``domainlm release-lm``), or the current split while no release is cut.

After a release this stage writes the same bytes whatever documents arrive, so ``dvc repro`` skips base_model,
train_lora, diff, merge, evaluate_experts and evaluate until the next release (:mod:`domainlm.documents.release`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from domainlm.common import params as P
from domainlm.common import paths
from domainlm.common.stage import parse_stage_args, stage_run
from domainlm.documents.release import lm_documents

log = logging.getLogger("stages.lm_data")  # the logger stage_run("lm_data") configures


def run(
    release_dir: str | os.PathLike,
    split_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    domains: Sequence[str],
) -> dict:
    """Write ``<out_dir>/<domain>/{train,val,test}.parquet`` from the release (or the split, at release 0).

    Returns:
        Metrics: ``{"release", "source", "docs": {domain: {split: documents}}, "total"}``
        (:func:`domainlm.documents.release.lm_documents`).

    Raises:
        ValueError: ``domains`` is empty. ReleaseError: a domain is not in the release.
        FileNotFoundError: the release manifest or a source file is missing.
    """
    if not domains:
        raise ValueError("params.yaml `domains` is empty")
    return lm_documents(release_dir, split_dir, out_dir, domains)


def main(argv: Sequence[str] = ()) -> None:
    """DVC entry point: params ``domains`` -> data/lm/, metrics/lm_data.json."""
    parse_stage_args("lm_data", __doc__, argv)
    with stage_run("lm_data") as st:
        metrics = run(paths.RELEASE_DIR, paths.SPLIT_DIR, paths.LM_DATA_DIR, P.required_domains("lm_data"))
        st.write_metrics("lm_data", metrics)
        st.log.info(
            "lm_data: %d documents from %s (LM release %d)", metrics["total"], metrics["source"], metrics["release"]
        )


if __name__ == "__main__":
    main(sys.argv[1:])
