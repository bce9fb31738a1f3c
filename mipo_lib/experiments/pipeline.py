"""The pipeline's stages as functions a notebook, the quickstart or a benchmark calls in one line each.

Every stage writes under `runs/<preset>/<task>/<variant>/` and reuses what a previous run finished with the same
settings (`mipo_lib.cache`: each result is stored with the key of every setting it depends on; pass `redo=True` to
recompute), so notebooks run on their own (03 builds the pairs if 02 has not run) and a rerun after an interruption
continues where it stopped. Each stage loads a fresh base model (under a second for SmolLM2) because
TRL injects the LoRA adapter into the model it is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mipo_lib import cache, dpo, evaluate, memory
from mipo_lib import methods as registry
from mipo_lib.analysis import stats
from mipo_lib.config import Preset, get_preset, run_dir
from mipo_lib.errors import MipoError
from mipo_lib.models import load_for_preset, load_model_and_tokenizer
from mipo_lib.pairs import VALIDATION_SEED, build_pairs, cached_pairs, pairs_key, variant_name
from mipo_lib.tasks import get_task
from mipo_lib.tasks.base import Example, Task


def variant_dir(preset: Preset, *parts: str | int) -> Path:
    return run_dir(preset, preset.task, variant_name(preset), *parts)


def training_key(preset: Preset, method: str, seed: int) -> cache.Key:
    """What a trained method's adapter depends on: `dpo.adapter_key` of the method's training (kind and trainer
    arguments, not its name: MIPO+CAD's adapter is MIPO's) for the seed's pairs."""
    return dpo.adapter_key(_trained(method).trainer, preset, seed)


def adapter_dir(preset: Preset, method: str, seed: int) -> Path:
    """Where a trained adapter lives: `<variant>/seed<k>/<training kind>-<digest of its key>` (`dpo.adapter_name`;
    shared by the methods trained alike; not created here)."""
    training = _trained(method).trainer
    return variant_dir(preset, f"seed{seed}") / dpo.adapter_name(training, dpo.adapter_key(training, preset, seed))


def evaluation_key(preset: Preset, method: str, seed: int) -> cache.Key:
    """What a method's test records depend on (`evaluate.evaluation_key`): the evaluation fields (and CAD's strength),
    the held-out prompts, the method's definition, and a trained method's adapter key (so also its seed)."""
    m = registry.get_method(method)
    task = get_task(preset.task)
    label = f"{method} evaluation" + ("" if m.deterministic else f" (seed {seed})")
    adapter = training_key(preset, method, seed) if m.training else None
    return evaluate.evaluation_key(preset, label, task.examples("test", preset.n_test_prompts), adapter, method=method)


def _eval_path(preset: Preset, method: str, seed: int) -> Path:
    """A method's records: deterministic ones once per task (outside any variant), trained ones per variant and seed."""
    m, digest = registry.get_method(method), evaluation_key(preset, method, seed).digest
    if m.deterministic:  # run_dir makes folders: the file name goes outside
        return run_dir(preset, preset.task, "eval") / f"{m.slug}-{digest}.jsonl"
    return variant_dir(preset, "eval") / f"{m.slug}-seed{seed}-{digest}.jsonl"


def _trained(method: str) -> registry.Method:
    """The registered method `method`, which must have a training stage (opt-in methods included)."""
    m = registry.get_method(method)
    if m.trainer is None:
        raise MipoError(f"method {method!r} has no training stage; train one of {[t.name for t in registry.trained(opt_in=True)]}")
    return m


def pairs_for_seed(preset: Preset, seed: int, redo: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Stage 1: the seed's MIPO pairs (generated, scored and stored, or read back)."""
    if not redo and (finished := cached_pairs(preset, seed)) is not None:
        return finished  # no model load for a finished stage
    with memory.stage(f"pairs (seed {seed})"):
        model, tokenizer = load_for_preset(preset)
        return build_pairs(model, tokenizer, get_task(preset.task), preset, seed, redo=redo, progress=progress)


def validation_pairs(preset: Preset, redo: bool = False, progress: bool = True) -> list[dict[str, Any]] | None:
    """The validation pairs every seed's DPO run is evaluated on while it trains (`pairs.N_VALIDATION_PROMPTS`
    validation prompts, sampled once with `pairs.VALIDATION_SEED`), built and cached like a seed's training pairs;
    None for a task without a validation split (its runs log no validation curve)."""
    if not has_validation(preset):
        return None
    if not redo and (finished := cached_pairs(preset, VALIDATION_SEED, split="validation")) is not None:
        return finished
    with memory.stage("validation pairs"):
        model, tokenizer = load_for_preset(preset)
        return build_pairs(model, tokenizer, get_task(preset.task), preset, VALIDATION_SEED, redo=redo,
                           progress=progress, split="validation")


def has_validation(preset: Preset) -> bool:
    """Whether the preset's task has a validation split (the personalization and arithmetic tasks do; the reasoning
    datasets have train and test only)."""
    try:
        return bool(get_task(preset.task).examples("validation"))
    except MipoError:
        return False


def train_for_seed(preset: Preset, method: str, seed: int, redo: bool = False, progress: bool = True) -> dpo.TrainResult:
    """Stage 2: train a method with a training stage (MIPO: DPO, the SFT baseline: SFT, any registered one by name) on
    the seed's pairs, with what its registry entry says trains it (`dpo.train`)."""
    m, key, folder = _trained(method), training_key(preset, method, seed), adapter_dir(preset, method, seed)
    if not redo and (finished := dpo.finished_run(folder, key)) is not None:
        return finished
    pairs = pairs_for_seed(preset, seed, progress=progress)
    # DPO only: validation pairs are DPO rows (SFT would score only the positives); not in the key (they change nothing
    # the run trains, tests/test_validation_curves.py), so an adapter trained without them is still reused
    monitored = {"eval_pairs": validation_pairs(preset, progress=progress)} if m.trainer.kind == "dpo" else {}
    with memory.stage(f"train {method} (seed {seed})"):
        model, tokenizer = load_for_preset(preset)
        return dpo.train(m.trainer, model, tokenizer, pairs, preset, seed, folder, key=key, redo=redo, progress=progress,
                         **monitored)


def evaluate_method(preset: Preset, method: str, seed: int, redo: bool = False, progress: bool = True) -> pd.DataFrame:
    """Stage 3: one method's per-example records on the held-out prompts (replies cached as JSON Lines, judged on
    every read by the task's current judge)."""
    task = get_task(preset.task)
    examples = task.examples("test", preset.n_test_prompts)
    m = registry.get_method(method)

    def make() -> pd.DataFrame:
        # train first (if needed): that stage loads its own copy, so only one model is in memory at a time
        adapter = train_for_seed(preset, method, seed, progress=progress).adapter_dir if m.training else None
        with memory.stage(f"evaluate {method}" + ("" if m.deterministic else f" (seed {seed})")):
            model, tokenizer = load_for_preset(preset)
            if adapter is not None:
                model = dpo.load_adapted(model, adapter)
            responses, truncated = evaluate.generate_replies(
                model, tokenizer, task, examples, preset,
                with_context=m.with_context,
                cad_alpha=preset.cad_strength if m.decoding == "cad" else None,
                progress=progress, desc=f"{method} responses",
            )
            return evaluate.records(task, examples, responses, method, seed, truncated)

    key = evaluation_key(preset, method, seed)
    frame = evaluate.cached_records(_eval_path(preset, method, seed), key, make, task, examples, redo)
    return frame.assign(seed=seed)


def stored_adapters(preset: Preset, methods: Sequence[str], seeds: Sequence[int]) -> dict[tuple[str, int], Path]:
    """{(method, seed): adapter folder} of the trained ones among `methods`, as `train_for_seed` stored them under the
    preset's keys; a missing one stops the caller before anything is generated: an evaluation of stored adapters
    trains nothing (another adapter would answer another question)."""
    found = {}
    for method in (m for m in methods if registry.get_method(m).training):
        for seed in seeds:
            folder = adapter_dir(preset, method, seed)
            if dpo.finished_run(folder, training_key(preset, method, seed)) is None:
                raise MipoError(f"no finished {method} adapter for seed {seed} under {folder.parent} with these "
                                f"settings; recreate the reference run's adapters (make reproduce with its seeds, at "
                                f"its commit, with its --set dtype if it had one), then rerun")
            found[(method, seed)] = folder
    return found


def evaluate_stored(
    preset: Preset, task: Task, examples: Sequence[Example], found: dict[tuple[str, int], Path],
    seeds: Sequence[int], methods: Sequence[str], progress: bool = True, cache_dir: Path | None = None,
) -> pd.DataFrame:
    """Per-prompt records of `methods` x `seeds` on any `examples` of `task` (prompts the preset's own evaluation
    never asked: new requests, test-only constraints), answered by the base model (untrained methods: decoded once and
    repeated for each seed, as the pipeline pairs deterministic methods) or by the adapters `found`
    (`stored_adapters`), with the preset's evaluation settings.

    With `cache_dir`, each method's replies (and each seed's, for a trained one) are stored there under their
    `evaluate.evaluation_key` (on `task`'s prompts) and read back by a later call, so an interrupted run continues."""

    def replies(method: str, seed: int, adapter: Path | None) -> pd.DataFrame:
        model, tokenizer = load_for_preset(preset)
        if adapter is not None:
            model = dpo.load_adapted(model, adapter)
        texts, cut = evaluate.generate_replies(model, tokenizer, task, examples, preset, progress=progress,
                                               desc=f"{method} on {len(examples)} {task.name} prompts")
        return evaluate.records(task, examples, texts, method, seed, cut)

    def stored(method: str, seed: int) -> pd.DataFrame:
        adapter = found.get((method, seed))
        if cache_dir is None:
            return replies(method, seed, adapter)
        m = registry.get_method(method)
        key = evaluate.evaluation_key(preset.with_overrides(task=task.name), f"{method} evaluation on {task.name}"
                                      + ("" if m.deterministic else f" (seed {seed})"), examples,
                                      training_key(preset, method, seed) if m.training else None, method=method)
        path = cache_dir / (f"{m.slug}-{key.digest}.jsonl" if m.deterministic else f"{m.slug}-seed{seed}-{key.digest}.jsonl")
        return evaluate.cached_records(path, key, lambda: replies(method, seed, adapter), task, examples)

    once = {m: stored(m, seeds[0]) for m in methods if not registry.get_method(m).training}
    frames = [frame.assign(seed=s) for frame in once.values() for s in seeds]
    frames += [stored(m, s) for s in seeds for m in methods if (m, s) in found]
    return pd.concat(frames, ignore_index=True)


def evaluate_all(
    preset: Preset, seeds: Sequence[int], methods: Sequence[str] | None = None, redo: bool = False, progress: bool = True
) -> pd.DataFrame:
    """`methods` (default: every registered method) x seeds as one records table (deterministic methods computed
    once, repeated per seed)."""
    methods = registry.names() if methods is None else methods
    frames = [evaluate_method(preset, m, s, redo=redo, progress=progress) for s in seeds for m in methods]
    return pd.concat(frames, ignore_index=True)


def pmi_key(preset: Preset, part: pd.DataFrame, label: str) -> cache.Key:
    """What a PMI table depends on: the scoring fields, the held-out prompts and the scored responses themselves
    (`part`'s example ids and responses), whichever evaluation they came from."""
    task = get_task(preset.task)
    responses = [[str(i), str(r)] for i, r in zip(part.example_id, part.response.fillna(""))]
    return cache.stage_key(
        "pmi", preset, label, prompts=cache.prompts_digest(task, task.examples("test", preset.n_test_prompts)),
        responses=cache.content_digest(responses)[:16],
    )


def pmi_before_after(
    preset: Preset, records: pd.DataFrame, progress: bool = True, *, before: str = "prompting",
    after: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Base-model PMI log pi0(y|x,c) - log pi0(y|x) of the responses of `before` (an untrained method, so the base
    model's own responses: `model = "base"`) and of each trained method in `after` (`model` = its name), per seed.

    `after` defaults to the registry's DPO-trained methods (MIPO). `before` is deterministic, so its PMI is computed
    once and repeated for every seed. Cache files are named by the methods' registered slugs.
    """
    task = get_task(preset.task)
    examples = {e.id: e for e in task.examples("test", preset.n_test_prompts)}

    def scored(part: pd.DataFrame, model_name: str, label: str, folder: Path, slug: str) -> pd.DataFrame:
        def make() -> pd.DataFrame:
            with memory.stage(label):
                model, tokenizer = load_for_preset(preset)
                exs = [examples[i] for i in part.example_id]
                pmi = evaluate.response_pmi(model, tokenizer, task, exs, part.response.fillna("").tolist(), preset)
            return pd.DataFrame({"example_id": part.example_id.values, "group": part.group.values, "model": model_name, "pmi": pmi})

        key = pmi_key(preset, part, label)
        return evaluate.evaluate_cached(folder / f"{slug}-{key.digest}.jsonl", make, key=key)

    untrained = registry.get_method(before)
    if not untrained.deterministic:
        raise MipoError(f"{before!r} is trained per seed; the PMI before training needs an untrained method")
    trained = [m for m in registry.trained() if m.training == "dpo"] if after is None else [_trained(a) for a in after]
    seeds = sorted(records.seed.unique())
    first = records[(records.method == before) & (records.seed == seeds[0])]
    base = scored(first, "base", f"PMI of the {before} responses", run_dir(preset, preset.task, "eval"), f"pmi-{untrained.slug}")
    out = []
    for seed in seeds:
        out.append(base.assign(seed=seed))
        for m in trained:
            part = records[(records.method == m.name) & (records.seed == seed)]
            label = f"PMI of the {m.name} responses (seed {seed})"
            out.append(scored(part, m.name, label, variant_dir(preset, "eval"), f"pmi-{m.slug}-seed{seed}").assign(seed=seed))
    return pd.concat(out, ignore_index=True)


def training_logs(preset: Preset, seeds: Sequence[int], progress: bool = True) -> pd.DataFrame:
    """The training curves of every seed's trained methods (MIPO, SFT) as one table (method, seed, step, ...)."""
    frames = []
    for seed in seeds:
        for m in registry.trained():
            res = train_for_seed(preset, m.name, seed, progress=progress)
            frames.append(res.log.assign(method=m.name, seed=seed))
    return pd.concat(frames, ignore_index=True)


def judge_run(
    preset_name: str, *, judge_id: str | None = None, judge_4bit: bool | None = None, progress: bool = True,
    **overrides: Any,
) -> pd.DataFrame:
    """The PRISM evaluation of a GPU run, end to end: every method's records of the preset's seeds (computed or read
    from the cache), judged with the official judge and protocol; prints and returns win-or-tie and strict win of
    each method against the reference. The judged table is cached beside the records under `evaluate.judge_key`
    (the judge, its 4-bit setting and dtype, the judge prompt, the judged inputs and replies). `judge_4bit` defaults
    to the preset's `load_in_4bit` (a 14B judge fits a T4 in 4 bits)."""
    preset = get_preset(preset_name, **overrides)
    task = get_task(preset.task)
    if getattr(task, "program_judge", True):
        raise MipoError(f"task {preset.task!r} is judged in code; judge_run is for LLM-judged tasks such as prism")
    examples = task.examples("test", preset.n_test_prompts)
    records = evaluate_all(preset, list(preset.seeds), progress=progress)
    judge_id = judge_id or evaluate.judge_for(preset.model_id)
    key = evaluate.judge_key(preset, records, examples, judge_id, judge_4bit)

    def make() -> pd.DataFrame:
        judge, tok = load_model_and_tokenizer(judge_id, dtype=preset.dtype, load_in_4bit=key.values["judge_4bit"])
        return evaluate.judge_records(records, examples, judge, tok, preset, progress=progress)

    judged = evaluate.evaluate_cached(run_dir(preset, preset.task, "judged") / f"judged-{key.digest}.jsonl", make, key=key)
    for method in [m for m in judged["method"].unique() if m != evaluate.REFERENCE]:
        rates = stats.win_rates_per_seed(judged, method, evaluate.REFERENCE)
        print(f"{method:>18} vs {evaluate.REFERENCE}: win-or-tie {rates.win_or_tie.mean():.1%}, strict win "
              f"{rates.strict_win.mean():.1%} (mean of {len(rates)} seeds, {int(rates.n.min())}+ prompts each)")
    return judged
