"""The pipeline's stages as functions a notebook, the quickstart or a benchmark calls in one line each.

Every stage writes under `runs/<preset>/<task>/<variant>/` and reuses what a previous run finished (pass
`redo=True` to recompute), so notebooks run on their own (03 builds the pairs if 02 has not run) and a rerun after an
interruption continues where it stopped. Each stage loads a fresh base model (under a second for SmolLM2) because
TRL injects the LoRA adapter into the model it is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mipo_lib import dpo, evaluate
from mipo_lib import methods as registry
from mipo_lib.config import Preset, run_dir
from mipo_lib.models import load_for_preset
from mipo_lib.pairs import build_pairs, cached_pairs, variant_name
from mipo_lib.tasks import get_task


def variant_dir(preset: Preset, *parts: str | int) -> Path:
    return run_dir(preset, preset.task, variant_name(preset), *parts)


def adapter_dir(preset: Preset, method: str, seed: int) -> Path:
    """Where a trained adapter lives; DPO settings that change the result are part of the folder name."""
    training = registry.get_method(method).training
    tag = f"beta{preset.beta:g}-lr{preset.learning_rate:g}-ep{preset.epochs}" if training == "dpo" else f"lr{preset.sft_learning_rate:g}-ep{preset.epochs}"
    return variant_dir(preset, f"seed{seed}", f"{training}-{tag}")


def pairs_for_seed(preset: Preset, seed: int, redo: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Stage 1: the seed's MIPO pairs (generated, scored and stored, or read back)."""
    if not redo and (finished := cached_pairs(preset, seed)) is not None:
        return finished  # no model load for a finished stage
    model, tokenizer = load_for_preset(preset)
    return build_pairs(model, tokenizer, get_task(preset.task), preset, seed, redo=redo, progress=progress)


def train_for_seed(preset: Preset, method: str, seed: int, redo: bool = False, progress: bool = True) -> dpo.TrainResult:
    """Stage 2: train a method with a training stage (MIPO: DPO, the SFT baseline: SFT) on the seed's pairs."""
    folder = adapter_dir(preset, method, seed)
    if not redo and (finished := dpo.finished_run(folder)) is not None:
        return finished
    pairs = pairs_for_seed(preset, seed, progress=progress)
    model, tokenizer = load_for_preset(preset)
    train = {"dpo": dpo.train_dpo, "sft": dpo.train_sft}[registry.get_method(method).training]
    return train(model, tokenizer, pairs, preset, seed, folder, redo=redo, progress=progress)


def _eval_path(preset: Preset, method: str, seed: int | None) -> Path:
    m = registry.get_method(method)
    slug = f"{m.slug}-a{preset.cad_strength:g}" if m.decoding == "cad" else m.slug
    slug = f"{slug}-n{preset.n_test_prompts}-len{preset.eval_max_new_tokens}"
    if seed is None:  # deterministic methods do not depend on the seed
        return run_dir(preset, preset.task, "eval") / f"{slug}.jsonl"  # run_dir makes folders: the file name goes outside
    return variant_dir(preset, "eval") / f"{slug}-{adapter_dir(preset, method, seed).name}-seed{seed}.jsonl"


def evaluate_method(preset: Preset, method: str, seed: int, redo: bool = False, progress: bool = True) -> pd.DataFrame:
    """Stage 3: one method's per-example records on the held-out prompts (cached as JSON Lines)."""
    task = get_task(preset.task)
    examples = task.examples("test", preset.n_test_prompts)
    m = registry.get_method(method)

    def make() -> pd.DataFrame:
        # train first (if needed): that stage loads its own copy, so only one model is in memory at a time
        adapter = train_for_seed(preset, method, seed, progress=progress).adapter_dir if m.training else None
        model, tokenizer = load_for_preset(preset)
        if adapter is not None:
            model = dpo.load_adapted(model, adapter)
        responses = evaluate.generate_responses(
            model, tokenizer, task, examples, preset,
            with_context=m.with_context,
            cad_alpha=preset.cad_strength if m.decoding == "cad" else None,
            progress=progress, desc=f"{method} responses",
        )
        return evaluate.records(task, examples, responses, method, seed)

    frame = evaluate.evaluate_cached(_eval_path(preset, method, None if m.deterministic else seed), make, redo)
    return frame.assign(seed=seed)


def evaluate_all(
    preset: Preset, seeds: Sequence[int], methods: Sequence[str] | None = None, redo: bool = False, progress: bool = True
) -> pd.DataFrame:
    """`methods` (default: every registered method) x seeds as one records table (deterministic methods computed
    once, repeated per seed)."""
    methods = registry.names() if methods is None else methods
    frames = [evaluate_method(preset, m, s, redo=redo, progress=progress) for s in seeds for m in methods]
    return pd.concat(frames, ignore_index=True)


def pmi_before_after(preset: Preset, records: pd.DataFrame, progress: bool = True) -> pd.DataFrame:
    """Base-model PMI log pi0(y|x,c) - log pi0(y|x) of the prompting (base model) and MIPO responses, per seed.

    The prompting responses are greedy and the same for every seed, so their PMI is computed once.
    """
    task = get_task(preset.task)
    examples = {e.id: e for e in task.examples("test", preset.n_test_prompts)}

    def scored(part: pd.DataFrame, model_name: str, path: Path) -> pd.DataFrame:
        def make() -> pd.DataFrame:
            model, tokenizer = load_for_preset(preset)
            exs = [examples[i] for i in part.example_id]
            pmi = evaluate.response_pmi(model, tokenizer, task, exs, part.response.fillna("").tolist(), preset)
            return pd.DataFrame({"example_id": part.example_id.values, "group": part.group.values, "model": model_name, "pmi": pmi})

        return evaluate.evaluate_cached(path, make)

    seeds = sorted(records.seed.unique())
    prompting = records[(records.method == "prompting") & (records.seed == seeds[0])]
    base = scored(prompting, "base", run_dir(preset, preset.task, "eval") / f"pmi-prompting-n{preset.n_test_prompts}.jsonl")
    out = []
    for seed in seeds:
        mipo = records[(records.method == "MIPO") & (records.seed == seed)]
        path = variant_dir(preset, "eval") / f"pmi-n{preset.n_test_prompts}-{adapter_dir(preset, 'MIPO', int(seed)).name}-seed{seed}.jsonl"
        out += [base.assign(seed=seed), scored(mipo, "MIPO", path).assign(seed=seed)]
    return pd.concat(out, ignore_index=True)


def training_logs(preset: Preset, seeds: Sequence[int], progress: bool = True) -> pd.DataFrame:
    """The training curves of every seed's trained methods (MIPO, SFT) as one table (method, seed, step, ...)."""
    frames = []
    for seed in seeds:
        for m in registry.trained():
            res = train_for_seed(preset, m.name, seed, progress=progress)
            frames.append(res.log.assign(method=m.name, seed=seed))
    return pd.concat(frames, ignore_index=True)
