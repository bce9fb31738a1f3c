"""MIPO preference pairs: y+ sampled from the base model given the right prompt, y- given another prompt.

Kinds of negative (as in the paper's official code):
- `random_prompt`: y- is the positive of a random *other* training prompt (plain prompt-response MI, math/MC).
  The assignment is a derangement, so no prompt is ever paired with its own response.
- `random_context`: y- is the positive of the same request under another user's context (the version for which the
  conditional MI derivation is exact).
- `context_drop`: y- is sampled for the same request with the context removed (official PRISM code).
`k_negatives > 1` gives K pairs per prompt with K different negatives (K distinct derangements / K samples).

Every pair is scored once under the base model: log pi0(y+|x), log pi0(y-|x) (DPO's reference log-probs, reused by
the trainer) and log pi0(y|x') for both sides, so each side's PMI log pi0(y|x) - log pi0(y|x') is stored with it.
Each side also records whether its sampled reply was cut off at `max_new_tokens` (`chosen_truncated`,
`rejected_truncated`): DPO learns from whatever text was sampled, a cut-off positive included. The task's judge of each
side under the pair's own example (`chosen_score`, `rejected_score`) is not stored: it is judged whenever the pairs
are read (`judged_pairs`), so it follows the judge of the moment (a preference checker registered anew).

On disk (`runs/<preset>/<task>/<variant>/seed<k>/pairs-<digest>/`, the digest of the generation key, see
`mipo_lib.cache`): `responses.jsonl` holds finished generation batches, one JSON line per batch, appended and flushed
as they complete; `pairs.jsonl` and `manifest.json` are written once at the end (atomically). Rerunning with the same
settings reuses the pairs; a run killed halfway resumes from the finished batches (only under the same generation
key), and a torn last line is dropped, so nothing is lost or duplicated. A changed scoring setting (`score_batch_size`,
`max_length`) rescores the stored responses without generating them again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mipo_lib import cache, files
from mipo_lib.config import Preset, run_dir
from mipo_lib.errors import MipoError
from mipo_lib.generate import GenerationStats, Messages, chat_prompt_ids, generate_reply_batches
from mipo_lib.scoring import pair_tokens, sequence_logprobs, token_digest
from mipo_lib.tasks import get_task
from mipo_lib.tasks.base import Example, Task, judge_or_nan

logger = logging.getLogger(__name__)

NEGATIVES = ("context_drop", "random_context", "random_prompt")


# --------------------------------------------------------------------------------------------- negative assignment
def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation with no fixed point (rejection sampling; ~e tries on average)."""
    if n < 2:
        raise MipoError(f"a derangement needs at least 2 prompts, got {n}; use more training prompts")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def grouped_derangement(groups: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """A derangement that keeps each index inside its group (same request, other context)."""
    groups = list(groups)
    out = np.empty(len(groups), dtype=int)
    for g in dict.fromkeys(groups):
        idx = np.array([i for i, x in enumerate(groups) if x == g])
        out[idx] = idx[derangement(len(idx), rng)]
    return out


def negative_sources(examples: Sequence[Example], negative: str, k: int, rng: np.random.Generator) -> list[list[int]]:
    """For each example, the indices of the K examples whose positives serve as its negatives.

    K rounds of derangements, redrawn until no example gets the same source twice (K distinct negatives).
    """
    if negative == "random_prompt":
        draw = lambda: derangement(len(examples), rng)  # noqa: E731
    elif negative == "random_context":
        draw = lambda: grouped_derangement([e.request for e in examples], rng)  # noqa: E731
    else:
        raise MipoError(f"negative {negative!r} does not reuse positives; valid: random_prompt, random_context")
    rounds: list[np.ndarray] = []
    for _ in range(k):
        for _attempt in range(1000):
            cand = draw()
            if all(not np.any(cand == r) for r in rounds):
                rounds.append(cand)
                break
        else:
            raise MipoError(f"cannot find {k} distinct negatives per prompt; lower k_negatives or add prompts")
    return [[int(r[i]) for r in rounds] for i in range(len(examples))]


# -------------------------------------------------------------------------------------------------- bookkeeping
#: What one line of `responses.jsonl` holds. Part of the generation key: a log written without the cut-off flags
#: (format 1) is never resumed or reused by code that reads them.
RESPONSE_LOG_FORMAT = 2


def generation_key(preset: Preset, seed: int, task: Task | None = None) -> cache.Key:
    """What the sampled responses depend on: the generation fields, the seed and the training prompts (the batch
    plan depends on the exact prompts, so a partial log resumes only when they are unchanged)."""
    task = task or get_task(preset.task)
    prompts = cache.prompts_digest(task, task.examples("train", preset.n_train_prompts, seed=seed))
    return cache.stage_key("generation", preset, f"generated responses (seed {seed})", seed=seed, prompts=prompts,
                           log_format=RESPONSE_LOG_FORMAT)


def pairs_key(preset: Preset, seed: int, task: Task | None = None) -> cache.Key:
    """What the finished pairs depend on: the generation key and the scoring fields."""
    return cache.stage_key("pairs", preset, f"pairs (seed {seed})", upstream=generation_key(preset, seed, task))


def variant_name(preset: Preset) -> str:
    """Folder name for a kind of pairs: e.g. `context_drop-k1`."""
    return f"{preset.negative}-k{preset.k_negatives}"


def pairs_dir(preset: Preset, seed: int, task: Task | None = None) -> Path:
    """The seed's pairs folder, named by the generation key: other sampling settings get a folder of their own."""
    key = generation_key(preset, seed, task)
    return run_dir(preset, preset.task, variant_name(preset), f"seed{seed}", f"pairs-{key.digest}")


class BatchLog:
    """Append-only JSON Lines log of finished generation batches, tolerant of a torn last line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[tuple[str, int], dict[str, Any]] = {}
        if path.exists():
            good: list[str] = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a batch interrupted mid-write: regenerate it
                key = (rec["stage"], rec["batch"])
                if key not in self.done:
                    self.done[key] = rec
                    good.append(line)
            files.write_text(path, "".join(g + "\n" for g in good))  # drop the torn tail before appending

    def finished(self, stage: str) -> set[int]:
        return {b for (s, b) in self.done if s == stage}

    def append(self, stage: str, batch: int, rows: list[int], texts: list[str], cut: list[bool]) -> None:
        rec = {"stage": stage, "batch": batch, "rows": rows, "texts": texts, "cut": cut}
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done[(stage, batch)] = rec

    def replies(self, stage: str, n: int) -> tuple[list[str], list[bool]]:
        """The stage's `n` responses in prompt order, and whether each was cut off at the token cap."""
        out: list[tuple[str, bool] | None] = [None] * n
        for (s, _), rec in self.done.items():
            if s == stage:
                for row, text, cut in zip(rec["rows"], rec["texts"], rec["cut"]):
                    out[row] = (text, bool(cut))
        missing = [i for i, t in enumerate(out) if t is None]
        if missing:
            raise RuntimeError(f"stage {stage}: {len(missing)} responses missing after generation")
        return [t[0] for t in out], [t[1] for t in out]  # type: ignore[index]


def _sample(
    stage: str, model: Any, tokenizer: Any, prompts: list[Messages], preset: Preset, seed: int,
    log: BatchLog, stats: GenerationStats, progress: bool,
) -> tuple[list[str], list[bool]]:
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    stage_seed = seed * 10 + {"positive": 1, "negative": 2}[stage]
    for batch, texts, cut in generate_reply_batches(
        model, tokenizer, ids,
        max_new_tokens=preset.max_new_tokens, temperature=preset.temperature, top_p=preset.top_p,
        batch_size=preset.gen_batch_size, seed=stage_seed, skip_batches=log.finished(stage),
        stats=stats, progress=progress, desc=f"{stage} responses",
    ):
        log.append(stage, batch.index, batch.rows, texts, cut)
    return log.replies(stage, len(prompts))


# ----------------------------------------------------------------------------------------------------- main entry
def build_pairs(
    model: Any,
    tokenizer: Any,
    task: Task,
    preset: Preset,
    seed: int,
    *,
    redo: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate, pair, score and store the MIPO pairs of one seed; reuse them when they already exist."""
    if preset.negative not in NEGATIVES:
        raise MipoError(f"unknown negative {preset.negative!r}; choose one of: {', '.join(NEGATIVES)}")
    if preset.negative != "random_prompt" and not task.conditional:
        raise MipoError(f"task {task.name!r} has no context to drop or swap; use negative='random_prompt'")
    gen_key, key = generation_key(preset, seed, task), pairs_key(preset, seed, task)
    folder = pairs_dir(preset, seed, task)
    pairs_path, manifest_path, log_path = folder / "pairs.jsonl", folder / "manifest.json", folder / "responses.jsonl"
    if redo:
        for p in (pairs_path, manifest_path, log_path, cache.key_file(pairs_path), cache.key_file(log_path)):
            p.unlink(missing_ok=True)
    examples = task.examples("train", preset.n_train_prompts, seed=seed)
    if cache.reuse(pairs_path, key):
        return judged_pairs(task, examples, load_pairs(pairs_path))
    cache.prepare(pairs_path, key)  # says why they are (re)made; the pairs file is replaced below
    if log_path.exists() and not cache.reuse(log_path, gen_key) and cache.prepare(log_path, gen_key):
        log_path.unlink()  # a partial generation of other settings: start afresh
    cache.store(log_path, gen_key)  # the resume marker: finished batches below belong to this key
    positives_prompts = [task.prompt(e) for e in examples]

    rng = np.random.default_rng(seed)
    stats = GenerationStats()
    started = time.perf_counter()
    log = BatchLog(log_path)
    positives, positives_cut = _sample("positive", model, tokenizer, positives_prompts, preset, seed, log, stats, progress)

    # (example index, negative prompt x', negative response y-) for every pair
    k = preset.k_negatives
    if preset.negative == "context_drop":
        neg_prompts = [task.prompt(e, with_context=False) for e in examples for _ in range(k)]
        negatives, negatives_cut = _sample("negative", model, tokenizer, neg_prompts, preset, seed, log, stats, progress)
        triples = [(i, neg_prompts[i * k + j], negatives[i * k + j], "context_drop", negatives_cut[i * k + j])
                   for i in range(len(examples)) for j in range(k)]
    else:
        sources = negative_sources(examples, preset.negative, k, rng)
        triples = [(i, positives_prompts[s], positives[s], examples[s].id, positives_cut[s])
                   for i in range(len(examples)) for s in sources[i]]
    gen_seconds = time.perf_counter() - started

    # Four scores per pair: both responses under x (reference log-probs) and under x' (for the PMI).
    score_start = time.perf_counter()
    xs = [positives_prompts[i] for i, *_ in triples]
    x_negs = [t[1] for t in triples]
    ys_pos = [positives[i] for i, *_ in triples]
    ys_neg = [t[2] for t in triples]
    kw = dict(max_length=preset.max_length, batch_size=preset.score_batch_size, progress=progress)
    lp_pos_x, n_pos = sequence_logprobs(model, tokenizer, xs + x_negs, ys_pos + ys_pos, desc="scoring positives", **kw)
    lp_neg_x, n_neg = sequence_logprobs(model, tokenizer, xs + x_negs, ys_neg + ys_neg, desc="scoring negatives", **kw)
    m = len(triples)
    score_seconds = time.perf_counter() - score_start

    records = []
    for j, (i, x_neg, y_neg, source, neg_cut) in enumerate(triples):
        ex = examples[i]
        records.append({
            "pair_id": f"{ex.id}-n{j % k}",
            "example_id": ex.id,
            "group": task.group(ex),
            "negative_source": source,
            "prompt": xs[j],
            "negative_prompt": x_neg,
            "chosen": ys_pos[j],
            "rejected": y_neg,
            "ref_chosen_logps": float(lp_pos_x[j]),
            "ref_rejected_logps": float(lp_neg_x[j]),
            "chosen_logps_neg_prompt": float(lp_pos_x[m + j]),
            "rejected_logps_neg_prompt": float(lp_neg_x[m + j]),
            "pmi_chosen": float(lp_pos_x[j] - lp_pos_x[m + j]),
            "pmi_rejected": float(lp_neg_x[j] - lp_neg_x[m + j]),
            "chosen_truncated": positives_cut[i],
            "rejected_truncated": neg_cut,
            "chosen_tokens": int(n_pos[j]),
            "rejected_tokens": int(n_neg[j]),
            "chosen_token_digest": token_digest(*pair_tokens(tokenizer, xs[j], ys_pos[j], preset.max_length)),
            "rejected_token_digest": token_digest(*pair_tokens(tokenizer, xs[j], y_neg, preset.max_length)),
        })
    files.write_text(pairs_path, "".join(json.dumps(r) + "\n" for r in records))
    manifest = {
        "settings": dict(key.values),
        "settings_digest": key.digest,
        "preset": preset.name,
        "variant": variant_name(preset),
        "n_prompts": len(examples),
        "n_pairs": len(records),
        "identical_pairs": sum(r["chosen"] == r["rejected"] for r in records),
        "duplicate_negatives": duplicate_negatives(records),
        "truncated_chosen": sum(r["chosen_truncated"] for r in records),
        "truncated_rejected": sum(r["rejected_truncated"] for r in records),
        "generated_tokens": stats.new_tokens,
        "generation_seconds": round(gen_seconds, 2),
        "generation_tokens_per_s": round(stats.tokens_per_s, 2),
        "scoring_seconds": round(score_seconds, 2),
        "scored_tokens": int(n_pos.sum() + n_neg.sum()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    files.write_text(manifest_path, json.dumps(manifest, indent=2))
    cache.store(pairs_path, key)  # last: the pairs count as finished only once pairs and manifest are written
    if manifest["duplicate_negatives"]:
        logger.warning(
            "%d of %d negatives repeat another negative of the same prompt (K=%d, temperature %g): those pairs add no "
            "new contrast; raise the temperature or lower k_negatives",
            manifest["duplicate_negatives"], len(records), k, preset.temperature,
        )
    return judged_pairs(task, examples, records)


def judged_pairs(task: Task, examples: Sequence[Example], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` with `chosen_score` and `rejected_score`: the task's judge of each side now, under the pair's own
    example (1 = the positive's preference met / answer right; NaN for an LLM-judged task)."""
    by_id = {e.id: e for e in examples}
    unknown = sorted({r["example_id"] for r in rows} - set(by_id))
    if unknown:
        raise MipoError(f"pairs of {len(unknown)} prompts task {task.name!r} does not have (e.g. {unknown[0]!r}); "
                        "rebuild them with redo=True")
    return [{**r, "chosen_score": judge_or_nan(task, by_id[r["example_id"]], r["chosen"]),
             "rejected_score": judge_or_nan(task, by_id[r["example_id"]], r["rejected"])} for r in rows]


def duplicate_negatives(records: Sequence[dict[str, Any]]) -> int:
    """How many pairs repeat a negative already used for the same prompt (text equal after whitespace trimming).

    With K > 1 negatives sampled at a low temperature (the `paper` preset's 0.1) the K replies are often the same
    text: such pairs duplicate a contrast instead of adding one, and K then means less than it says.
    """
    seen: set[tuple[str, str]] = set()
    repeats = 0
    for r in records:
        key = (r["example_id"], " ".join(str(r["rejected"]).split()))
        repeats += key in seen
        seen.add(key)
    return repeats


def cached_pairs(preset: Preset, seed: int) -> list[dict[str, Any]] | None:
    """The finished pairs of a seed made with these settings (no model needed), judged now; None if there are none."""
    path = pairs_dir(preset, seed) / "pairs.jsonl"
    if not cache.reuse(path, pairs_key(preset, seed)):
        return None
    task = get_task(preset.task)
    return judged_pairs(task, task.examples("train", preset.n_train_prompts, seed=seed), load_pairs(path))


def load_pairs(path: Path) -> list[dict[str, Any]]:
    """Read a pairs file, checking each row has the fields DPO needs (a malformed row is named, not skipped)."""
    required = {"prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"}
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MipoError(f"{Path(path).name} line {n} is not valid JSON ({exc.msg}); delete the file or rerun with redo=True") from None
        missing = required - set(row)
        if missing:
            raise MipoError(f"{Path(path).name} line {n} lacks {sorted(missing)}; regenerate the pairs with redo=True")
        rows.append(row)
    return rows


def load_manifest(preset: Preset, seed: int) -> dict[str, Any]:
    return json.loads((pairs_dir(preset, seed) / "manifest.json").read_text())
