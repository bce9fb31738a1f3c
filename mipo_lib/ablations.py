"""Ablations of MIPO: how many negatives, which negative, how strong the KL leash, MIPO vs its decoding twin.

The paper reports means over (mostly) three seeds without error bars and leaves open questions (METHOD.md): more than
one negative (K > 1), random-context vs dropped-context negatives, a beta sweep, MIPO vs context-aware decoding
(CAD), diversity, win-or-tie vs strict win. This module answers them with the pipeline that already exists:

- A *variant* is the preset with one field changed (`variant_presets`): `k_negatives`, `negative` or `beta`. Its
  pairs, adapter and evaluation land in their own folders under `runs/<preset>/<task>/...` (the variant folder
  names the negative and K, the adapter folder names beta, lr and epochs), so every run is cached and resumable,
  and the variant equal to the preset reuses what notebooks 02-04 built.
- `run_variants` evaluates MIPO for each variant and seed and adds a `variant` column to the per-example records,
  next to the `prompting` baseline (deterministic, evaluated once): `stats.paired_difference(..., unit="variant")`
  then compares any two of them on the same examples.
- `kl_to_base` estimates how far the trained policy moved: KL(pi_theta || pi0) per prompt by Monte Carlo.
- `generation_cost` times MIPO and CAD on the same prompts (seconds per prompt).
- `conclusion` turns a difference with a CI into one honest sentence, null results included.

Figures of the ablations are drawn here (per-seed points and 95% CIs) and saved by the notebook with
`plots.savefig`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from mipo_lib import dpo, evaluate, pipeline, stats
from mipo_lib.config import Preset
from mipo_lib.errors import MipoError
from mipo_lib.generate import Messages, chat_prompt_ids, plan_batches
from mipo_lib.models import load_for_preset
from mipo_lib.pairs import NEGATIVES
from mipo_lib.plots import PALETTE, caption, colour, jitter, subplots
from mipo_lib.scoring import completion_logprobs
from mipo_lib.tasks import get_task

#: The issue's full settings (the notebook's defaults).
K_VALUES: tuple[int, ...] = (1, 2, 4)
NEGATIVE_KINDS: tuple[str, ...] = NEGATIVES
BETAS: tuple[float, ...] = (0.05, 0.1, 0.3)
BASELINE = "prompting"

_FIELDS = {"K": "k_negatives", "negative": "negative", "beta": "beta"}


# ----------------------------------------------------------------------------------------------------------------
# variants
# ----------------------------------------------------------------------------------------------------------------


def variant_label(kind: str, value: Any) -> str:
    """Display name of a variant: `K=2`, `random_context`, `beta=0.3`."""
    if kind == "K":
        return f"K={int(value)}"
    if kind == "beta":
        return f"beta={float(value):g}"
    if kind == "negative":
        return str(value)
    raise MipoError(f"unknown ablation {kind!r}; choose one of: {', '.join(_FIELDS)}")


def variant_presets(preset: Preset, kind: str, values: Iterable[Any]) -> dict[str, Preset]:
    """`{label: preset with one field changed}` for the ablation `kind` ('K', 'negative' or 'beta').

    Labels keep the order of `values`; duplicates are dropped. Invalid values fail early with the valid choices.
    """
    if kind not in _FIELDS:
        raise MipoError(f"unknown ablation {kind!r}; choose one of: {', '.join(_FIELDS)}")
    out: dict[str, Preset] = {}
    for value in values:
        if kind == "K" and int(value) < 1:
            raise MipoError(f"K must be at least 1, got {value}")
        if kind == "negative" and value not in NEGATIVES:
            raise MipoError(f"unknown negative {value!r}; choose one of: {', '.join(NEGATIVES)}")
        if kind == "beta" and not float(value) > 0:
            raise MipoError(f"beta must be positive, got {value}")
        cast = int(value) if kind == "K" else float(value) if kind == "beta" else str(value)
        out.setdefault(variant_label(kind, cast), preset.with_overrides(**{_FIELDS[kind]: cast}))
    return out


def reference_label(preset: Preset, kind: str, labels: Sequence[str]) -> str:
    """The variant that equals the preset itself (K=1, context_drop, beta=0.1 by default), else the first one."""
    own = variant_label(kind, getattr(preset, _FIELDS[kind]))
    return own if own in labels else labels[0]


def run_variants(
    variants: dict[str, Preset],
    seeds: Sequence[int],
    *,
    method: str = "MIPO",
    baseline: str | None = BASELINE,
    redo: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-example records of `method` for every variant and seed, plus the baseline, with a `variant` column.

    Each call goes through `pipeline.evaluate_method`, which builds (or reads back) the variant's pairs, adapter and
    evaluation, so an interrupted ablation resumes where it stopped. The baseline is evaluated with the first
    variant's preset (an untrained method does not depend on the variant) and labelled `variant = baseline`.
    """
    if not variants:
        raise MipoError("no variants to run")
    frames = []
    for label, p in variants.items():
        for s in seeds:
            frames.append(pipeline.evaluate_method(p, method, s, redo=redo, progress=progress).assign(variant=label))
    if baseline is not None:
        first = next(iter(variants.values()))
        for i, s in enumerate(seeds):  # deterministic: one file shared by all seeds, so redo it once at most
            frames.append(pipeline.evaluate_method(first, baseline, s, redo=redo and i == 0, progress=progress)
                          .assign(variant=baseline))
    return pd.concat(frames, ignore_index=True)


def pair_counts(variants: dict[str, Preset], seeds: Sequence[int], progress: bool = True) -> pd.DataFrame:
    """Number of training pairs and optimizer steps per variant and seed (the pairs are built if missing)."""
    rows = []
    for label, p in variants.items():
        for s in seeds:
            n = len(pipeline.pairs_for_seed(p, s, progress=progress))
            steps = math.ceil(n / (p.batch_size * p.grad_accum)) * p.epochs
            rows.append({"variant": label, "seed": s, "pairs": n, "optimizer_steps": steps})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# statistics and sentences
# ----------------------------------------------------------------------------------------------------------------


def conclusion(
    diff: dict[str, Any],
    what: str,
    *,
    unit: str = "points",
    scale: float = 100.0,
    digits: int = 1,
    words: tuple[str, str] = ("gain", "loss"),
) -> str:
    """One sentence from a difference with a 95% CI (a `stats.paired_difference` dict, or any dict with
    `mean`, `lo`, `hi` and optionally `n_seeds`, `n_examples`, `ci_over`).

    Rates are in [0, 1], so the default `scale=100` writes points. The verdict comes from the CI alone: above 0 is a
    detectable gain, below 0 a detectable loss, straddling 0 "no detectable effect at this size" (not "no effect":
    a small effect may hide in a wide CI). A CI over seeds only, from one seed, gives no verdict.

    >>> conclusion({"mean": 0.05, "lo": 0.02, "hi": 0.08, "n_seeds": 3, "n_examples": 200}, "MIPO - prompting")
    'MIPO - prompting: +5.0 points [95% CI +2.0, +8.0]; the CI excludes 0: a detectable gain (3 seeds x 200 examples).'
    """
    mean, lo, hi = (float(diff.get(k, float("nan"))) for k in ("mean", "lo", "hi"))
    if not all(map(math.isfinite, (mean, lo, hi))):
        return f"{what}: not computable (no finite values)."
    n_seeds, n_ex = diff.get("n_seeds"), diff.get("n_examples")
    size = []
    if n_seeds is not None:
        size.append(f"{int(n_seeds)} seed{'s' if int(n_seeds) != 1 else ''}")
    if n_ex is not None:
        size.append(f"{int(n_ex)} examples")
    size_text = f" ({' x '.join(size)})" if size else ""
    biggest = max(abs(scale * mean), abs(scale * lo), abs(scale * hi))
    while 0 < biggest < 10 ** (1 - digits) and digits < 6:  # tiny values: more decimals, so "+0.0" never hides them
        digits += 1
    fmt = f"{{:+.{digits}f}}"
    unit_text = f" {unit}" if unit else ""
    head = f"{what}: {fmt.format(scale * mean)}{unit_text} [95% CI {fmt.format(scale * lo)}, {fmt.format(scale * hi)}]"
    if diff.get("ci_over") == "seeds" and n_seeds is not None and int(n_seeds) < 2:
        return f"{head}; one seed only, so no CI over seeds: no conclusion{size_text}."
    if diff.get("deterministic"):
        return f"{head}; both sides are identical in every seed (deterministic methods), so the CI over seeds is " \
               f"degenerate: one measured difference, no verdict{size_text}."
    if lo > 0:
        return f"{head}; the CI excludes 0: a detectable {words[0]}{size_text}."
    if hi < 0:
        return f"{head}; the CI excludes 0: a detectable {words[1]}{size_text}."
    return f"{head}; the CI includes 0: no detectable effect at this size{size_text}."


def seed_difference(a: Sequence[float], b: Sequence[float], n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Mean of per-seed differences a_s - b_s with a bootstrap CI over seeds (for per-seed metrics such as
    distinct-2 or seconds per prompt, which have no per-example values). `ci_over = "seeds"`; `deterministic` is
    True when both sides are the same in every seed (e.g. greedy CAD vs prompting), where that CI has zero width
    and says nothing: `conclusion` then gives no verdict."""
    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a_ - b_)
    a_, b_ = a_[ok], b_[ok]
    d = a_ - b_
    if d.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n_seeds": 0, "ci_over": "seeds"}
    mean, lo, hi = stats.bootstrap_ci(d, n_boot=n_boot, seed=seed)
    fixed = d.size > 1 and np.ptp(a_) == 0 and np.ptp(b_) == 0
    return {"mean": mean, "lo": lo, "hi": hi, "n_seeds": int(d.size), "per_seed": d.tolist(), "ci_over": "seeds",
            "deterministic": bool(fixed)}


def compare_variants(
    records: pd.DataFrame,
    labels: Sequence[str],
    reference: str | None,
    baseline: str = BASELINE,
    n_boot: int = 5_000,
    seed: int = 0,
    value: str = "score",
) -> pd.DataFrame:
    """One row per variant: its rate with CI over seeds and examples, its paired difference vs the baseline
    (prompting) and vs the reference variant, each with a CI, per-seed values and a `conclusion` sentence."""
    rows = []
    for v in labels:
        h = stats.hierarchical_bootstrap(records, v, n_boot=n_boot, seed=seed, value=value, unit="variant")
        row: dict[str, Any] = {"variant": v, "rate": h["mean"], "lo": h["lo"], "hi": h["hi"], "per_seed": h["per_seed"],
                               "seeds": h["seeds"], "n_seeds": h["n_seeds"], "n_examples": h["n_examples"]}
        for key, other in (("gain", baseline), ("vs_ref", reference)):
            if other is None or other == v or other not in set(records["variant"]):
                row.update({key: np.nan, f"{key}_lo": np.nan, f"{key}_hi": np.nan, f"{key}_per_seed": [], f"{key}_text": ""})
                continue
            d = stats.paired_difference(records, v, other, n_boot=n_boot, seed=seed, value=value, unit="variant")
            row.update({key: d["mean"], f"{key}_lo": d["lo"], f"{key}_hi": d["hi"],
                        f"{key}_per_seed": [p["diff"] for p in d["per_seed"]],
                        f"{key}_text": conclusion(d, f"{v} - {other}")})
        rows.append(row)
    return pd.DataFrame(rows)


def run_ablation(
    preset: Preset,
    kind: str,
    values: Iterable[Any],
    seeds: Sequence[int],
    *,
    n_boot: int = 5_000,
    redo: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """One ablation end to end: variants, MIPO records of every variant and seed (plus prompting), the comparison
    table and the prompting baseline's rate. Returns `dict(kind, variants, reference, records, table, baseline)`."""
    variants = variant_presets(preset, kind, values)
    labels = list(variants)
    reference = reference_label(preset, kind, labels)
    records = run_variants(variants, seeds, redo=redo, progress=progress)
    return {
        "kind": kind,
        "variants": variants,
        "reference": reference,
        "records": records,
        "table": compare_variants(records, labels, reference, n_boot=n_boot),
        "baseline": stats.hierarchical_bootstrap(records, BASELINE, n_boot=n_boot, unit="variant"),
    }


SUMMARY_COLUMNS: tuple[str, ...] = (
    "ablation", "variant", "rate", "lo", "hi", "vs_prompting", "vs_prompting_lo", "vs_prompting_hi",
    "vs_reference", "vs_reference_lo", "vs_reference_hi", "kl_nats", "kl_lo", "kl_hi", "n_seeds", "n_examples",
    "per_seed_rate",
)


def summary_table(results: dict[str, dict[str, Any]], kl: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every ablation's variants in one long table (`SUMMARY_COLUMNS`): rate, paired differences vs prompting and
    vs the reference variant, each with its 95% CI, and the KL to the base where `kl` (a `kl_table`) has the variant.

    `results` maps a name ("K", "negative", "beta") to a `run_ablation` result. This is the small reference result
    the notebook writes next to its figures, so the numbers behind them can be read without rerunning anything.
    """
    kl_by = kl.set_index("variant") if kl is not None and len(kl) else None
    rows = []
    for name, ab in results.items():
        for r in ab["table"].itertuples():
            row = {"ablation": name, "variant": r.variant, "rate": r.rate, "lo": r.lo, "hi": r.hi,
                   "vs_prompting": r.gain, "vs_prompting_lo": r.gain_lo, "vs_prompting_hi": r.gain_hi,
                   "vs_reference": r.vs_ref, "vs_reference_lo": r.vs_ref_lo, "vs_reference_hi": r.vs_ref_hi,
                   "n_seeds": r.n_seeds, "n_examples": r.n_examples,
                   "per_seed_rate": " ".join(f"{v:.4g}" for v in r.per_seed)}
            if kl_by is not None and r.variant in kl_by.index:
                k = kl_by.loc[r.variant]
                row.update({"kl_nats": k["mean"], "kl_lo": k["lo"], "kl_hi": k["hi"]})
            rows.append(row)
    return pd.DataFrame(rows).reindex(columns=list(SUMMARY_COLUMNS))


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """`compare_variants` as readable text: rate and differences in % / points with their CIs, seeds' values."""

    def ci(m: float, lo: float, hi: float, signed: bool = True) -> str:
        if not np.isfinite(m):
            return ""
        f = "{:+.1f}" if signed else "{:.1f}"
        return f"{f.format(100 * m)} [{f.format(100 * lo)}, {f.format(100 * hi)}]"

    return pd.DataFrame({
        "variant": table["variant"],
        "rate % [95% CI]": [ci(r.rate, r.lo, r.hi, signed=False) for r in table.itertuples()],
        "per seed %": [" / ".join(f"{100 * v:.1f}" for v in r.per_seed) for r in table.itertuples()],
        "vs prompting, points": [ci(r.gain, r.gain_lo, r.gain_hi) for r in table.itertuples()],
        "vs reference, points": [ci(r.vs_ref, r.vs_ref_lo, r.vs_ref_hi) for r in table.itertuples()],
    }).set_index("variant")


def _paired_scores(records: pd.DataFrame, a: str, b: str) -> list[tuple[Any, np.ndarray, np.ndarray, np.ndarray]]:
    """Per seed: (seed, example ids, scores of a, scores of b) on their common examples, both scores finite.
    A method stored with one seed (deterministic) is paired with every seed of the other."""
    pa = records[records["method"] == a].pivot(index="example_id", columns="seed", values="score")
    pb = records[records["method"] == b].pivot(index="example_id", columns="seed", values="score")
    if pa.empty or pb.empty:
        raise MipoError(f"a win-rate comparison needs records of both {a!r} and {b!r}")
    out = []
    for s in sorted(set(pa.columns) | set(pb.columns)):
        sa = pa[s] if s in pa.columns else pa.iloc[:, 0]
        sb = pb[s] if s in pb.columns else pb.iloc[:, 0]
        common = sa.index.intersection(sb.index)
        x, y = sa.loc[common].to_numpy(float), sb.loc[common].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        out.append((s, np.asarray(common)[ok], x[ok], y[ok]))
    return out


def win_rates_per_seed(records: pd.DataFrame, a: str = "MIPO", b: str = BASELINE) -> pd.DataFrame:
    """`stats.win_rates` (the function the LLM-judge path applies to 1-5 scores) on each seed's paired scores."""
    return pd.DataFrame([{"seed": s, **stats.win_rates(x, y)} for s, _, x, y in _paired_scores(records, a, b)])


def win_tie_frame(records: pd.DataFrame, a: str = "MIPO", b: str = BASELINE) -> pd.DataFrame:
    """Per (seed, example) outcome of `a` against `b` on the same example, as 0/1 indicators in long form:
    `metric` in {win-or-tie, strict win, tie, loss}, `score` 0/1, so `stats.hierarchical_bootstrap(...,
    unit="metric")` gives each rate a CI over seeds and examples."""
    rows = []
    for s, ids, x, y in _paired_scores(records, a, b):
        for metric, ind in (("win-or-tie", x >= y), ("strict win", x > y), ("tie", x == y), ("loss", x < y)):
            rows.append(pd.DataFrame({"seed": s, "example_id": ids, "metric": metric, "score": ind.astype(float)}))
    return pd.concat(rows, ignore_index=True)


def win_tie_table(records: pd.DataFrame, a: str = "MIPO", b: str = BASELINE, n_boot: int = 5_000, seed: int = 0) -> pd.DataFrame:
    """Win-or-tie, strict-win, tie and loss rates of `a` vs `b` with CIs over seeds and examples (`per_seed` equals
    `win_rates_per_seed`)."""
    frame = win_tie_frame(records, a, b)
    rows = []
    for metric in ("win-or-tie", "strict win", "tie", "loss"):
        h = stats.hierarchical_bootstrap(frame, metric, n_boot=n_boot, seed=seed, unit="metric")
        rows.append({"metric": metric, "rate": h["mean"], "lo": h["lo"], "hi": h["hi"], "per_seed": h["per_seed"],
                     "n_seeds": h["n_seeds"], "n_examples": h["n_examples"]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# how far the policy moved: KL(pi_theta || pi0)
# ----------------------------------------------------------------------------------------------------------------


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}


def sample_token_ids(
    model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int = 16,
    seed: int = 0, progress: bool = False,
) -> list[list[int]]:
    """One reply per prompt sampled from the model's own distribution (temperature 1, no top-k, no top-p), as the
    generated token ids up to and including the first end-of-sequence token (or `max_new_tokens` tokens).

    Batches and seeds follow `generate.plan_batches`, as in `generate.generate_batches`; unlike that function this
    keeps the token ids, so they can be scored exactly as sampled (decoding and re-encoding text can change them).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad_id, eos = tokenizer.pad_token_id, _eos_ids(model, tokenizer)
    out: list[list[int]] = [[] for _ in prompt_ids]
    bar = tqdm(total=len(prompt_ids), desc="sampling from the policy", disable=not progress, unit="prompt")
    for batch in plan_batches(prompt_ids, batch_size, seed):
        rows = [list(prompt_ids[r]) for r in batch.rows]
        width = max(map(len, rows))
        input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        torch.manual_seed(batch.seed)
        with torch.inference_mode():
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad_id, use_cache=True)
        for row, new in zip(batch.rows, gen[:, width:].tolist()):
            cut = next((k for k, t in enumerate(new) if t in eos), None)
            out[row] = new if cut is None else new[: cut + 1]
        bar.update(len(batch.rows))
    bar.close()
    return out


def token_logprobs(
    model: Any, prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16
) -> np.ndarray:
    """Summed log model(completion | prompt) of exactly these token ids (`scoring.completion_logprobs`)."""
    return completion_logprobs(model, prompt_ids, completions, pad_id, batch_size=batch_size)


def sampled_kl(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    prompts: Sequence[Messages],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    score_batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Monte-Carlo KL(policy || reference) per prompt, sequence level: one reply y ~ policy(.|x) per prompt
    (temperature 1, no top-k/top-p, seeded), then log policy(y|x) - log reference(y|x) of exactly the sampled tokens.

    Averaged over y ~ policy this is KL(policy || reference) exactly, so one sample per prompt is an unbiased but
    noisy estimate (a single prompt's value can be negative): report the mean over prompts with a CI. Replies stop
    at `max_new_tokens`, so it is the KL of the first `max_new_tokens` tokens (at most the full KL). The sampled
    token ids are scored as they are: decoding to text and re-tokenizing would score different tokens and bias the
    estimate. `batch_size` is for sampling, `score_batch_size` (default: the same) for scoring. Columns:
    `response, logp_policy, logp_base, n_tokens, kl` (nats).
    """
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    completions = sample_token_ids(policy, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   seed=seed, progress=progress)
    score_bs = score_batch_size or batch_size
    lp_pol = token_logprobs(policy, ids, completions, tokenizer.pad_token_id, score_bs)
    lp_ref = token_logprobs(reference, ids, completions, tokenizer.pad_token_id, score_bs)
    eos = _eos_ids(policy, tokenizer)
    responses = [tokenizer.decode([t for t in c if t not in eos], skip_special_tokens=True).strip() for c in completions]
    return pd.DataFrame({"response": responses, "logp_policy": lp_pol, "logp_base": lp_ref,
                         "n_tokens": [len(c) for c in completions], "kl": lp_pol - lp_ref})


def base_and_mipo(preset: Preset, seed: int, progress: bool = True) -> tuple[Any, Any, Any]:
    """The base model, the seed's MIPO policy (trained first if missing, adapter merged) and the tokenizer."""
    trained = pipeline.train_for_seed(preset, "MIPO", seed, progress=progress).adapter_dir
    base, tokenizer = load_for_preset(preset)
    return base, dpo.load_adapted(load_for_preset(preset)[0], trained), tokenizer


def kl_to_base(
    preset: Preset,
    seed: int,
    *,
    n_prompts: int = 50,
    sample_seed: int = 0,
    max_new_tokens: int | None = None,
    redo: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """KL(pi_theta || pi0) of the seed's trained MIPO policy on `n_prompts` held-out prompts (with context), per
    prompt, cached next to the evaluation. The adapter is trained first if missing. Columns: `seed, example_id,
    group, kl, logp_policy, logp_base, n_tokens, response`."""
    task = get_task(preset.task)
    n = min(int(n_prompts), preset.n_test_prompts)
    examples = task.examples("test", n)
    new_tokens = max_new_tokens or preset.eval_max_new_tokens
    adapter = pipeline.adapter_dir(preset, "MIPO", seed)
    path = pipeline.variant_dir(preset, "eval") / f"kl-{adapter.name}-seed{seed}-n{n}-t{new_tokens}-s{sample_seed}.jsonl"

    def make() -> pd.DataFrame:
        base, policy, tokenizer = base_and_mipo(preset, seed, progress)
        frame = sampled_kl(
            policy, base, tokenizer, [task.prompt(e) for e in examples], max_new_tokens=new_tokens,
            batch_size=preset.gen_batch_size, score_batch_size=preset.score_batch_size, seed=sample_seed,
            progress=progress,
        )
        return frame.assign(example_id=[e.id for e in examples], group=[task.group(e) for e in examples])

    frame = evaluate.evaluate_cached(path, make, redo)
    frame["response"] = frame["response"].astype(str)
    cols = ["seed", "example_id", "group", "kl", "logp_policy", "logp_base", "n_tokens", "response"]
    return frame.assign(seed=seed)[cols]


def kl_for_variants(
    variants: dict[str, Preset], seeds: Sequence[int], *, n_prompts: int = 50, redo: bool = False, progress: bool = True
) -> pd.DataFrame:
    """`kl_to_base` for every variant and seed, with a `variant` column."""
    frames = [kl_to_base(p, s, n_prompts=n_prompts, redo=redo, progress=progress).assign(variant=label)
              for label, p in variants.items() for s in seeds]
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------------------------------
# generation cost: MIPO (a trained model, one forward per token) vs CAD (two forwards per token)
# ----------------------------------------------------------------------------------------------------------------


def _timed(
    model: Any, tokenizer: Any, task: Any, examples: Sequence[Any], preset: Preset, cad_alpha: float | None, repeats: int
) -> tuple[float, list[str]]:
    """Best of `repeats` wall-clock timings (the minimum is the least disturbed by other work on a shared machine)."""
    best, out = float("inf"), []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = evaluate.generate_responses(model, tokenizer, task, examples, preset, cad_alpha=cad_alpha, progress=False)
        best = min(best, time.perf_counter() - start)
    return best, out


def generation_cost(
    preset: Preset, seed: int, *, n_prompts: int = 50, repeats: int = 2, redo: bool = False, progress: bool = True
) -> pd.DataFrame:
    """Seconds per prompt of greedy evaluation on the same `n_prompts` held-out prompts for prompting (base
    model), MIPO (the seed's merged adapter) and CAD (base model, a = `preset.cad_strength`).

    Same prompts, batch size and `eval_max_new_tokens` for all three; one untimed warm-up pass per model, then the
    best of `repeats` timings. A batch stops when all its rows have ended, so methods with shorter replies finish
    sooner: `mean_words` is kept alongside. Wall-clock timings on a shared machine vary (up to 2x in the pilot);
    the seeds give repeated measurements. Cached per seed (`redo=True` times again). Columns: `method, seed,
    n_prompts, seconds, s_per_prompt, mean_words`.
    """
    task = get_task(preset.task)
    n = min(int(n_prompts), preset.n_test_prompts)
    examples = task.examples("test", n)
    adapter = pipeline.adapter_dir(preset, "MIPO", seed)
    path = pipeline.variant_dir(preset, "eval") / f"cost-{adapter.name}-a{preset.cad_strength:g}-seed{seed}-n{n}.jsonl"

    def make() -> pd.DataFrame:
        base, mipo, tokenizer = base_and_mipo(preset, seed, progress)
        rows = []
        for method, model, alpha in (("prompting", base, None), ("MIPO", mipo, None), ("CAD", base, preset.cad_strength)):
            warm = examples[: min(len(examples), preset.eval_batch_size)]
            evaluate.generate_responses(model, tokenizer, task, warm, preset, cad_alpha=alpha, progress=False)
            seconds, out = _timed(model, tokenizer, task, examples, preset, alpha, repeats)
            rows.append({"method": method, "n_prompts": n, "seconds": seconds, "s_per_prompt": seconds / n,
                         "mean_words": float(np.mean([len(r.split()) for r in out]))})
        return pd.DataFrame(rows)

    frame = evaluate.evaluate_cached(path, make, redo)
    return frame.assign(seed=seed)[["method", "seed", "n_prompts", "seconds", "s_per_prompt", "mean_words"]]


def cost_summary(cost: pd.DataFrame, n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Mean seconds per prompt per method with a bootstrap CI over seeds, and the ratio to MIPO."""
    rows = []
    mipo = cost.loc[cost["method"] == "MIPO", "s_per_prompt"].mean()
    for method in stats.ordered_methods(cost["method"]):
        v = cost.loc[cost["method"] == method, "s_per_prompt"].to_numpy(float)
        mean, lo, hi = stats.bootstrap_ci(v, n_boot=n_boot, seed=seed)
        rows.append({"method": method, "s_per_prompt": mean, "lo": lo, "hi": hi, "n_seeds": len(v),
                     "x_mipo": mean / mipo if mipo else np.nan,
                     "mean_words": float(cost.loc[cost["method"] == method, "mean_words"].mean())})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# figures (saved by the notebook with plots.savefig(fig, "06_<name>", preset, caption=fig.mipo_caption))
# ----------------------------------------------------------------------------------------------------------------


def _meta(meta: dict[str, Any], **over: Any) -> dict[str, Any]:
    return {"preset": "?", "model": "?", "task": "?", "n_seeds": None, "n_examples": None, **meta, **over}


def _dots(ax: Any, x: float, values: Sequence[float], col: str, horizontal: bool = False) -> None:
    v = np.asarray(values, dtype=float)
    if v.size:
        j = x + jitter(v.size, 0.16)
        ax.scatter(v if horizontal else j, j if horizontal else v, s=22, color="white", edgecolor=col, lw=1.2, zorder=4)


def plot_variants(
    table: pd.DataFrame,
    meta: dict[str, Any],
    title: str,
    baseline_row: dict[str, Any] | None = None,
    reference: str | None = None,
    kl: pd.DataFrame | None = None,
) -> Any:
    """An ablation at a glance: (left) MIPO's success rate per variant with the prompting baseline as a band,
    (middle) paired differences vs prompting and vs the reference variant, (right, optional) KL to the base model.

    `table` comes from `compare_variants`; `baseline_row` from `stats.hierarchical_bootstrap` of the baseline;
    `kl` is a table with columns `variant, mean, lo, hi, per_seed` (see `kl_table`). Bars/markers: means; error
    bars: 95% CIs over seeds and examples; white dots: individual seeds.
    """
    n_panels = 3 if kl is not None else 2
    labels = list(table["variant"])
    fig, axes = subplots(1, n_panels, (4.2 * n_panels + 0.6, 4.3))
    ax_r, ax_d = axes[0, 0], axes[0, 1]
    mipo_c = colour("MIPO")
    if baseline_row is not None:
        ax_r.axhspan(100 * baseline_row["lo"], 100 * baseline_row["hi"], color=PALETTE["prompting"], alpha=0.15, lw=0)
        ax_r.axhline(100 * baseline_row["mean"], color=PALETTE["prompting"], ls="--", lw=1.3,
                     label=f"prompting {100 * baseline_row['mean']:.1f}%")
    top = 10.0
    for i, r in table.reset_index(drop=True).iterrows():
        mean, lo, hi = 100 * r["rate"], 100 * r["lo"], 100 * r["hi"]
        ax_r.bar(i, mean, width=0.6, color=mipo_c, alpha=0.9 if r["variant"] == reference else 0.55, zorder=1)
        ax_r.errorbar(i, mean, yerr=[[mean - lo], [hi - mean]], fmt="none", ecolor="black", capsize=5, lw=1.5, zorder=3)
        _dots(ax_r, i, 100 * np.asarray(r["per_seed"]), "black")
        top = max(top, hi, *(100 * np.asarray(r["per_seed"])))
    ax_r.set_xticks(range(len(labels)), labels, rotation=15 if len(labels) > 2 else 0)
    ax_r.set_ylim(0, top * 1.3 + 5)
    ax_r.set_ylabel("MIPO success rate (%)")
    ax_r.set_title(title, fontsize=11)
    if baseline_row is not None:
        ax_r.legend(fontsize=8, loc="upper left")
    for key, marker, shift, name in (("gain", "o", -0.12, "vs prompting"), ("vs_ref", "s", 0.12, f"vs {reference}")):
        first = True
        for i, r in table.reset_index(drop=True).iterrows():
            if not np.isfinite(r[key]):
                continue
            m, lo, hi = 100 * r[key], 100 * r[f"{key}_lo"], 100 * r[f"{key}_hi"]
            face = mipo_c if key == "gain" else "white"
            ax_d.errorbar(i + shift, m, yerr=[[m - lo], [hi - m]], fmt=marker, color=mipo_c, mfc=face, ms=7, capsize=4,
                          lw=1.4, zorder=3, label=name if first else None)
            ps = 100 * np.asarray(r[f"{key}_per_seed"], dtype=float)
            ax_d.scatter(np.full(ps.shape, i + shift) + jitter(ps.size, 0.05), ps, s=14, color="gray", zorder=4)
            first = False
    ax_d.axhline(0.0, color="black", lw=0.8)
    ax_d.set_xticks(range(len(labels)), labels, rotation=15 if len(labels) > 2 else 0)
    ax_d.set_xlim(-0.6, len(labels) - 0.4)
    ax_d.set_ylabel("paired difference (points)")
    ax_d.set_title("Paired differences, same examples", fontsize=11)
    if ax_d.get_legend_handles_labels()[0]:
        ax_d.legend(fontsize=8)
    if kl is not None:
        ax_k = axes[0, 2]
        for i, v in enumerate(labels):
            sub = kl[kl["variant"] == v]
            if sub.empty:
                continue
            r = sub.iloc[0]
            ax_k.errorbar(i, r["mean"], yerr=[[r["mean"] - r["lo"]], [r["hi"] - r["mean"]]], fmt="D", color=mipo_c,
                          ms=7, capsize=5, lw=1.5, zorder=3)
            _dots(ax_k, i, r["per_seed"], mipo_c)
        ax_k.axhline(0.0, color="black", lw=0.8)
        ax_k.set_xticks(range(len(labels)), labels)
        ax_k.set_xlim(-0.6, len(labels) - 0.4)
        ax_k.set_ylabel("KL(policy || base) per prompt (nats)")
        ax_k.set_title("How far the policy moved", fontsize=11)
    m = _meta(meta)
    extra = (f"Left: bars = MIPO mean, dashed line and band = prompting (no training) with its CI. "
             f"{'Middle' if kl is not None else 'Right'}: paired differences on the same examples (filled: vs "
             f"prompting; open: vs the reference variant {reference}); grey dots: seeds.")
    if kl is not None:
        extra += (f"\nRight: Monte-Carlo KL, one sampled reply (temperature 1) per prompt on {m.get('kl_prompts', '?')} "
                  "held-out prompts; bars: 95% CI over seeds and prompts.")
    cap = caption(str(m["preset"]), str(m["model"]), str(m["task"]), m["n_seeds"], m["n_examples"],
                  bars="95% bootstrap CI over seeds and examples", extra=extra)
    fig.tight_layout()
    fig.mipo_caption = cap
    return fig


def kl_table(kl: pd.DataFrame, labels: Sequence[str], n_boot: int = 5_000, seed: int = 0) -> pd.DataFrame:
    """Mean KL per variant with a CI over seeds and prompts (`variant, mean, lo, hi, per_seed, n_seeds, n_prompts`)."""
    rows = []
    for v in labels:
        if v not in set(kl["variant"]):
            continue
        h = stats.hierarchical_bootstrap(kl, v, n_boot=n_boot, seed=seed, value="kl", unit="variant")
        rows.append({"variant": v, "mean": h["mean"], "lo": h["lo"], "hi": h["hi"], "per_seed": h["per_seed"],
                     "n_seeds": h["n_seeds"], "n_prompts": h["n_examples"]})
    return pd.DataFrame(rows)


def plot_twin(records: pd.DataFrame, cost: pd.DataFrame, meta: dict[str, Any], n_boot: int = 5_000, seed: int = 0) -> Any:
    """MIPO vs context-aware decoding: (left) success rate of prompting, MIPO and CAD with the paired MIPO - CAD
    difference, (right) generation cost in seconds per prompt (same prompts, same batch size)."""
    fig, axes = subplots(1, 2, (10.0, 4.3))
    ax_q, ax_c = axes[0]
    methods = [m for m in ("prompting", "MIPO", "CAD") if m in set(records["method"])]
    top = 10.0
    for i, m in enumerate(methods):
        h = stats.hierarchical_bootstrap(records, m, n_boot=n_boot, seed=seed)
        mean, lo, hi = 100 * h["mean"], 100 * h["lo"], 100 * h["hi"]
        ax_q.bar(i, mean, width=0.6, color=colour(m), alpha=0.85)
        ax_q.errorbar(i, mean, yerr=[[mean - lo], [hi - mean]], fmt="none", ecolor="black", capsize=5, lw=1.5)
        _dots(ax_q, i, 100 * np.asarray(h["per_seed"]), "black")
        top = max(top, hi)
    ax_q.set_xticks(range(len(methods)), methods)
    ax_q.set_ylim(0, top * 1.35 + 6)
    ax_q.set_ylabel("success rate (%)")
    ax_q.set_title("Quality", fontsize=11)
    if {"MIPO", "CAD"} <= set(methods):
        d = stats.paired_difference(records, "MIPO", "CAD", n_boot=n_boot, seed=seed)
        ax_q.text(0.03, 0.97, f"MIPO - CAD (paired): {100 * d['mean']:+.1f} pts\n[95% CI {100 * d['lo']:+.1f}, "
                  f"{100 * d['hi']:+.1f}]", transform=ax_q.transAxes, va="top", fontsize=9,
                  bbox={"boxstyle": "round", "fc": "white", "ec": "gray"})
    summary = cost_summary(cost, n_boot=n_boot, seed=seed)
    for i, r in summary.reset_index(drop=True).iterrows():
        ax_c.bar(i, r["s_per_prompt"], width=0.6, color=colour(r["method"]), alpha=0.85)
        ax_c.errorbar(i, r["s_per_prompt"], yerr=[[r["s_per_prompt"] - r["lo"]], [r["hi"] - r["s_per_prompt"]]],
                      fmt="none", ecolor="black", capsize=5, lw=1.5)
        _dots(ax_c, i, cost.loc[cost["method"] == r["method"], "s_per_prompt"].to_numpy(float), "black")
        top_c = max(r["hi"], float(cost.loc[cost["method"] == r["method"], "s_per_prompt"].max()))
        ax_c.text(i, top_c * 1.04, f"{r['x_mipo']:.2f}x", ha="center", va="bottom", fontsize=9)
    ax_c.set_xticks(range(len(summary)), list(summary["method"]))
    ax_c.set_ylim(0, float(cost["s_per_prompt"].max()) * 1.25)
    ax_c.set_ylabel("seconds per prompt (greedy)")
    ax_c.set_title("Generation cost (ratio to MIPO on top)", fontsize=11)
    m = _meta(meta)
    cap = caption(str(m["preset"]), str(m["model"]), str(m["task"]), m["n_seeds"], m["n_examples"],
                  bars="95% bootstrap CI over seeds and examples (left), over seeds (right)",
                  extra=f"CAD strength a = 1/beta = {m.get('cad_alpha', '?')}. Cost: wall-clock seconds per prompt "
                  f"on {m.get('cost_prompts', '?')} held-out prompts, best of repeated timings per seed (shared machine: "
                  "timings vary); prompting and CAD use the base model, MIPO the merged adapter.")
    fig.tight_layout()
    fig.mipo_caption = cap
    return fig


def plot_win_rates(table: pd.DataFrame, meta: dict[str, Any], a: str = "MIPO", b: str = BASELINE) -> Any:
    """Win-or-tie, strict win, tie and loss of `a` vs `b`: bars = mean, error bars = CI, dots = seeds."""
    fig, axes = subplots(1, 1, (6.4, 4.2))
    ax = axes[0, 0]
    cols = {"win-or-tie": "#55a868", "strict win": "#2d6a3e", "tie": "#9e9e9e", "loss": "#c44e52"}
    for i, r in table.reset_index(drop=True).iterrows():
        mean, lo, hi = 100 * r["rate"], 100 * r["lo"], 100 * r["hi"]
        ax.bar(i, mean, width=0.6, color=cols.get(r["metric"], "gray"), alpha=0.85)
        ax.errorbar(i, mean, yerr=[[mean - lo], [hi - mean]], fmt="none", ecolor="black", capsize=5, lw=1.5)
        _dots(ax, i, 100 * np.asarray(r["per_seed"]), "black")
        ax.text(i, hi + 1.5, f"{mean:.1f}%", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(table)), list(table["metric"]))
    ax.set_ylim(0, 115)
    ax.set_ylabel(f"share of prompts (%), {a} vs {b}")
    ax.set_title(f"{a} vs {b}: ties counted as wins or not", fontsize=11)
    m = _meta(meta)
    cap = caption(str(m["preset"]), str(m["model"]), str(m["task"]), m["n_seeds"], m["n_examples"],
                  extra="Scores here are the program judge's 0/1 (satisfied or not), so a tie means both failed or both "
                  "passed; the paper's LLM judge scores 1-5 and needs a GPU preset.")
    fig.tight_layout()
    fig.mipo_caption = cap
    return fig


__all__ = [
    "BETAS", "K_VALUES", "NEGATIVE_KINDS", "compare_variants", "conclusion", "cost_summary", "format_table",
    "generation_cost", "kl_for_variants", "kl_table", "kl_to_base", "pair_counts", "plot_twin", "plot_variants",
    "plot_win_rates", "reference_label", "run_ablation", "run_variants", "sample_token_ids", "sampled_kl",
    "seed_difference", "token_logprobs", "variant_label",
    "variant_presets", "win_rates_per_seed", "win_tie_frame", "win_tie_table",
]
