"""The DPO stage as a script, for `accelerate launch` on one or several GPUs (or CPU processes).

    accelerate launch --config_file mipo_lib/accelerate/multi_gpu.yaml -m mipo_lib.experiments.launch_dpo --preset paper --seed 0
    accelerate launch --config_file mipo_lib/accelerate/zero2.yaml     -m mipo_lib.experiments.launch_dpo --preset paper --seed 0
    accelerate launch --config_file mipo_lib/accelerate/cpu.yaml       -m mipo_lib.experiments.launch_dpo --preset smoke --seed 0
    accelerate launch --config_file mipo_lib/accelerate/cpu2.yaml      -m mipo_lib.experiments.launch_dpo --preset smoke --seed 0

It calls the same library functions as notebook 03 (`pipeline.pairs_for_seed`, `pipeline.train_for_seed`), so a
multi-GPU run writes its pairs and adapter where the notebooks look for them; `--set field=value` changes a preset
field as on `python -m mipo_lib`. Plain data parallelism (multi_gpu.yaml) is the default multi-GPU path; with
DeepSpeed ZeRO-2 (zero2.yaml, as the official code used) optimizer states and gradients are sharded across GPUs;
cpu2.yaml runs two CPU processes (gloo), which is how the tests prove the multi-process path without a GPU.

With several processes every one of them generates and scores its share of the pairs' batches (`mipo_lib.pairs`:
the same batches and seeds as one process, so the pairs file is byte-identical to a one-process run's), rank 0
merges and writes them, and then all of them train. Only rank 0 writes the pairs folder; TRL's trainer saves the
adapter from rank 0.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    from mipo_lib import methods as registry
    from mipo_lib.tasks import load_plugins

    load_plugins()  # MIPO_PLUGINS modules may register methods too
    trained = {m.name: m for m in registry.trained()}  # every registered method with a training stage
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=list(trained), default="MIPO")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="FIELD=VALUE",
                        help="change one preset field, e.g. --set gen_batch_size=8 (repeatable)")
    args = parser.parse_args(argv)

    from mipo_lib.config import get_preset, parse_assignments
    from mipo_lib.dpo import reward_accuracy
    from mipo_lib.errors import MipoError
    from mipo_lib.experiments import pipeline

    state = _distributed_state()
    try:
        preset = get_preset(args.preset, **parse_assignments(args.overrides))
        pipeline.pairs_for_seed(preset, args.seed, progress=state.is_main_process)  # every process builds its share
        result = pipeline.train_for_seed(preset, args.method, args.seed, redo=args.redo, progress=state.is_main_process)
    except MipoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if state.is_main_process:
        summary = f"{args.method} seed {args.seed}: {len(result.log)} steps, {result.seconds:.0f} s, adapter in {result.adapter_dir.name}"
        if trained[args.method].training == "dpo":  # reward accuracy is a DPO metric
            summary += f", reward accuracy (last quarter) {reward_accuracy(result.log):.2f}"
        print(summary)
    return 0


def _distributed_state() -> Any:
    """accelerate's process state, on the CPU where `mipo_lib.hardware` puts the model on the CPU.

    Why say so: `PartialState()` ignores the config's `use_cpu` (accelerate's multi-process launcher does not pass it
    on), so on a machine without a GPU the launched processes would form no group before the trainer joins them
    (`dpo` sets `use_cpu` there): each would build all the pairs alone and write the same files. With `cpu=True`
    they join one gloo group first and share the pairs."""
    from accelerate import PartialState

    from mipo_lib.hardware import select_device

    return PartialState(cpu=select_device().type == "cpu")


if __name__ == "__main__":
    sys.exit(main())
