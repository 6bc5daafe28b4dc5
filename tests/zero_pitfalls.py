"""Run by ``torchrun --nproc_per_node 2`` from tests/test_train_lora_zero.py: what accelerate and transformers do with
a DeepSpeed config on a machine without CUDA, on each rank. Writes ``<out>/pitfalls_rank<r>.json``.

1. ``TrainingArguments(use_cpu=False, deepspeed=...)`` left to itself: DeepSpeed's process group comes up, but
   accelerate records how many processes, and which one this is?
2. ``use_cpu=True`` with the same config: does accelerate still set up DeepSpeed?
3. After :func:`domainlm.common.zero.init_cpu_process_group` with ``use_configured_state``: the real world size?
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(out: str, config_json: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate.state import AcceleratorState
    from transformers import TrainingArguments

    from domainlm.common import zero

    config = json.loads(config_json)
    record = {"rank": int(os.environ["RANK"])}
    tmp = tempfile.mkdtemp()

    def probe(name: str, **kwargs) -> None:
        args = TrainingArguments(output_dir=tmp, report_to="none", deepspeed=json.loads(json.dumps(config)), **kwargs)
        state = args.distributed_state
        record[name] = {
            "distributed_type": str(state.distributed_type),
            "num_processes": state.num_processes,
            "process_index": state.process_index,
            "world_size": args.world_size,
        }
        AcceleratorState._reset_state(reset_partial_state=True)

    probe("default", use_cpu=False)
    probe("use_cpu", use_cpu=True)
    zero.init_cpu_process_group()
    probe("configured", use_cpu=False, accelerator_config=zero.accelerator_config())
    Path(out, f"pitfalls_rank{record['rank']}.json").write_text(json.dumps(record), encoding="utf-8")
    zero.finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
