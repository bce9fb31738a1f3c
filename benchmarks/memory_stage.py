"""Peak resident memory of one pipeline stage, alone in a fresh process, and where in the stage it happens.

    python benchmarks/memory_stage.py cad                 # evaluate CAD on the cpu preset (seed 0, float32)
    python benchmarks/memory_stage.py train --pairs 16    # train MIPO on the seed's first 16 pairs (4 steps)
    python benchmarks/memory_stage.py cad --prompts 20    # CAD on 20 held-out prompts (one batch of 20, not 100)
    python benchmarks/memory_stage.py train --train-prompts 8   # pairs from 8 prompts, then train MIPO on them
    python benchmarks/memory_stage.py train --set gradient_checkpointing=true   # the laptop option's training peak
    python benchmarks/memory_stage.py train --pairs 4 --set epochs=1 --saved   # what one step keeps for backward

The stage runs under `memory.stage` (the notebooks' measurement: VmHWM reset at the start, read at the end), with
its own `runs/` folder (`MIPO_RUNS_DIR`, a temporary one unless given) so nothing cached is reused. A thread samples
the resident size every 20 ms and records, at the peak, which library function was running (the innermost
`mipo_lib` frames of the main thread's stack): that names the place the peak comes from. Each climb of 100 MB past
the highest sample so far is printed as it happens, so a run stopped early still shows where memory went.

Scaling: a DPO step's peak depends on its batch (4 pairs at max_length 192), not on the number of steps, so a few
steps on the seed's first pairs reach the full stage's peak up to the longest batch's length. CAD decodes the
held-out prompts in batches of `eval_batch_size` (100 on the cpu preset: all of them at once), so with fewer prompts
the batch shrinks and its part of the peak shrinks in proportion.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class PeakSampler:
    """The resident size every `interval` s, and the main thread's innermost `mipo_lib` frame at the highest one."""

    def __init__(self, interval: float = 0.02, step_mb: float = 100.0) -> None:
        import psutil

        self._process, self._interval = psutil.Process(), interval
        self.peak_mb, self.where, self.step_mb = 0.0, "", step_mb
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _frame(self) -> str:
        frame = sys._current_frames().get(self._main)
        stack = traceback.extract_stack(frame) if frame is not None else []
        ours = [f for f in stack if "mipo_lib" in f.filename]
        outer = [f for f in stack if "mipo_lib" not in f.filename and "benchmarks" not in f.filename][-1:]
        return " > ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in ours[-2:] + outer)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            rss = self._process.memory_info().rss / 2**20
            if rss > self.peak_mb:
                if rss > self.peak_mb + self.step_mb:  # a live trace of the climb, for a run stopped before its end
                    print(f"  {rss:6.0f} MB at {self._frame()}", flush=True)
                self.peak_mb, self.where = rss, self._frame()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class SavedTensors:
    """What autograd keeps for the backward pass (`torch.autograd.graph.saved_tensors_hooks`): each storage counted
    once, the model's own parameters and buffers left out (they are resident anyway), grouped by the last dimension
    (on SmolLM2-135M: 1536 the MLP's intermediates, 576 hidden states, 64 attention heads, 8 LoRA's rank)."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[tuple[int, ...], int]] = {}
        self.weights: set[int] = set()

    def pack(self, tensor):  # type: ignore[no-untyped-def]
        storage = tensor.untyped_storage()
        self.seen.setdefault(storage.data_ptr(), (tuple(tensor.shape), storage.nbytes()))
        return tensor

    def note_model(self, model) -> None:  # type: ignore[no-untyped-def]
        self.weights.update(t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()])

    def report(self) -> str:
        from collections import Counter

        groups: Counter[int] = Counter()
        for ptr, (shape, nbytes) in self.seen.items():
            if ptr not in self.weights:
                groups[shape[-1] if shape else 0] += nbytes
        total = sum(groups.values())
        parts = ", ".join(f"last dim {dim}: {nbytes / 2**20:.0f} MB" for dim, nbytes in groups.most_common(5))
        return f"saved for backward (activations, weights excluded): {total / 2**20:.0f} MB; {parts}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["train", "cad"])
    parser.add_argument("--pairs", type=int, default=0, help="train on the seed's first N pairs (0: all)")
    parser.add_argument("--prompts", type=int, default=0, help="evaluate N held-out prompts (0: the preset's)")
    parser.add_argument("--train-prompts", type=int, default=0, help="build pairs from N prompts (0: the preset's)")
    parser.add_argument("--runs", default="", help="runs folder (default: a fresh temporary one)")
    parser.add_argument("--preset", default="cpu", help="the preset whose stage is measured (smoke: the tests' check)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="preset field overrides")
    parser.add_argument("--saved", action="store_true", help="train: also count what autograd saves for backward "
                        "(over the whole run: give --pairs 4 --set epochs=1 for one step)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MIPO_RUNS_DIR", args.runs or tempfile.mkdtemp(prefix="mipo-memory-"))

    from mipo_lib import memory
    from mipo_lib.config import get_preset, parse_assignments
    from mipo_lib.experiments import pipeline

    overrides = {"dtype": "float32", "seeds": (0,), **parse_assignments(args.set)}
    if args.prompts:
        overrides["n_test_prompts"] = args.prompts
    if args.train_prompts:
        overrides["n_train_prompts"] = args.train_prompts
    preset = get_preset(args.preset, **overrides)
    if args.stage == "train":
        pairs = pipeline.pairs_for_seed(preset, 0, progress=False)
        if args.pairs:  # the training stage reads its pairs through this function: hand it the first ones
            original = pipeline.pairs_for_seed
            pipeline.pairs_for_seed = lambda *a, **k: original(*a, **k)[: args.pairs]  # type: ignore[assignment]
        print(f"{len(pairs)} pairs, training on {args.pairs or len(pairs)}", flush=True)
    saved = SavedTensors() if args.saved and args.stage == "train" else None
    if saved is not None:
        import torch

        from mipo_lib import dpo

        train = dpo.train

        def noting_train(training, model, *a, **k):  # type: ignore[no-untyped-def]
            saved.note_model(model)  # type: ignore[union-attr]
            return train(training, model, *a, **k)

        pipeline.dpo.train = noting_train  # type: ignore[assignment]
    start = time.perf_counter()
    sampler = PeakSampler()
    try:
        if args.stage == "train" and saved is not None:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                pipeline.train_for_seed(preset, "MIPO", 0, redo=True, progress=False)
        elif args.stage == "train":
            pipeline.train_for_seed(preset, "MIPO", 0, redo=True, progress=False)
        else:
            pipeline.evaluate_method(preset, "CAD", 0, redo=True, progress=False)
    finally:
        sampler.stop()
    row = memory.recorded()[-1]
    print(f"stage {row.stage!r}: peak {row.peak_rss_mb:.0f} MB (VmHWM), {time.perf_counter() - start:.0f} s; "
          f"sampled peak {sampler.peak_mb:.0f} MB at {sampler.where}")
    if saved is not None:
        print(saved.report())


if __name__ == "__main__":
    main()
