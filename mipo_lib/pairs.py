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

Several processes (`accelerate launch`, `torchrun`: whatever initialized torch.distributed) share the work without
changing the result: the batch plans are those of one process (same batches, same per-batch seeds), rank r generates
batches r, r + W, r + 2W, ... into its own shard (`responses.rank<r>.jsonl`, resumable like the log), and rank 0
merges the shards into `responses.jsonl` in the order one process writes it; scoring is shared the same way, batch by
batch. So `responses.jsonl` and `pairs.jsonl` are byte-identical to a one-process run's (on the same kind of device),
and only rank 0 writes the pairs folder (each rank writes only its shard).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mipo_lib import cache, files
from mipo_lib.config import Preset, run_dir
from mipo_lib.decode_memory import check_gen_batch
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


#: The pairs' splits: `train` (one set per seed, what DPO trains on) and `validation` (one small set shared by every
#: seed, on which training reports its validation loss and reward margin, `validation_pairs`).
SPLITS = ("train", "validation")
#: Prompts of the validation pairs: enough for a readable curve, few enough that evaluating them once an epoch costs
#: little (cpu preset, five-seed reference run: 31 s to build them once, about 5 s per evaluation,
#: `dpo.evals_per_epoch`).
N_VALIDATION_PROMPTS = 20
#: The one seed the validation pairs are sampled with, whatever the training seed: every seed's run is then measured on
#: the very same pairs, so seeds' validation curves differ by their training only, and the pairs are built once.
VALIDATION_SEED = 0


def split_examples(task: Task, preset: Preset, seed: int, split: str = "train") -> list[Example]:
    """The prompts a split's pairs are built from: the seed's `n_train_prompts` training prompts, or the task's first
    `N_VALIDATION_PROMPTS` validation prompts (the task's balanced draw, which ignores the seed)."""
    if split == "train":
        return task.examples("train", preset.n_train_prompts, seed=seed)
    if split == "validation":
        available = len(task.examples("validation"))
        return task.examples("validation", min(N_VALIDATION_PROMPTS, available))
    raise MipoError(f"unknown pairs split {split!r}; use one of {', '.join(SPLITS)}")


def _split_seed(seed: int, split: str) -> int:
    return VALIDATION_SEED if split == "validation" else seed


def generation_key(preset: Preset, seed: int, task: Task | None = None, split: str = "train") -> cache.Key:
    """What the sampled responses depend on: the generation fields, the seed and the split's prompts (the batch
    plan depends on the exact prompts, so a partial log resumes only when they are unchanged). The validation split
    is named in the key (its seed is always `VALIDATION_SEED`); the training pairs' key is what it always was."""
    task = task or get_task(preset.task)
    prompts = cache.prompts_digest(task, split_examples(task, preset, seed, split))
    seed = _split_seed(seed, split)
    if split == "train":
        return cache.stage_key("generation", preset, f"generated responses (seed {seed})", seed=seed, prompts=prompts,
                               log_format=RESPONSE_LOG_FORMAT)
    return cache.stage_key("generation", preset, f"generated {split} responses", seed=seed, prompts=prompts,
                           log_format=RESPONSE_LOG_FORMAT, split=split)


def pairs_key(preset: Preset, seed: int, task: Task | None = None, split: str = "train") -> cache.Key:
    """What the finished pairs depend on: the generation key and the scoring fields."""
    label = f"pairs (seed {seed})" if split == "train" else f"{split} pairs"
    return cache.stage_key("pairs", preset, label, upstream=generation_key(preset, seed, task, split))


def variant_name(preset: Preset) -> str:
    """Folder name for a kind of pairs: e.g. `context_drop-k1`."""
    return f"{preset.negative}-k{preset.k_negatives}"


def pairs_dir(preset: Preset, seed: int, task: Task | None = None, split: str = "train") -> Path:
    """The seed's pairs folder (the validation pairs': one per variant, `<variant>/validation/`), named by the
    generation key: other sampling settings get a folder of their own."""
    key = generation_key(preset, seed, task, split)
    owner = f"seed{seed}" if split == "train" else split
    return run_dir(preset, preset.task, variant_name(preset), owner, f"pairs-{key.digest}")


@dataclass(frozen=True)
class Ranks:
    """The processes that build one seed's pairs together: torch.distributed's group when the run was launched with
    several (`accelerate launch`, `torchrun`), else this process alone.

    Why share the work rather than let rank 0 build the pairs while the others wait: the others' GPUs would idle,
    and a long wait at a collective outlives NCCL's timeout (10 minutes by default) on a large set.
    """

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """Whether this process writes the pairs folder (rank 0)."""
        return self.rank == 0

    def share(self, n_batches: int) -> set[int]:
        """This rank's batches of a plan of `n_batches`: r, r + W, r + 2W, ... (the longest batches come first in
        every plan, so dealing them out in turn keeps the ranks' loads even)."""
        return set(range(self.rank, n_batches, self.size))

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (a collective: every rank calls it)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


#: The stages of a generation, in the order one process runs them (and `responses.jsonl` lists them).
STAGES = ("positive", "negative")
SHARD_GLOB = "responses.rank*.jsonl"


def shard_path(log_path: Path, rank: int) -> Path:
    """Where rank `rank` of several processes logs the batches it generated, before rank 0 merges them."""
    return log_path.with_name(f"responses.rank{rank}.jsonl")


class BatchLog:
    """Append-only JSON Lines log of finished generation batches, tolerant of a torn last line.

    `repair` (the process that appends to it) rewrites the file without a torn last line before appending; a process
    that only reads the log of another (`repair=False`) skips that line without writing."""

    def __init__(self, path: Path, *, repair: bool = True) -> None:
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
            if repair:
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

    def absorb(self, shards: Sequence[Path]) -> None:
        """Take in the batches of other processes' shards that this log lacks, rewrite it in the order one process
        writes it (stage by stage, each in batch order) and delete the shards. The order makes the merged log
        byte-identical to a one-process run's whichever rank finished first."""
        if not shards:
            return
        for shard in shards:
            for key, rec in BatchLog(shard, repair=False).done.items():
                self.done.setdefault(key, rec)
        order = sorted(self.done, key=lambda k: (STAGES.index(k[0]), k[1]))
        self.done = {k: self.done[k] for k in order}
        files.write_text(self.path, "".join(json.dumps(rec) + "\n" for rec in self.done.values()))
        for shard in shards:
            shard.unlink(missing_ok=True)

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


def _generate_share(
    stage: str, model: Any, tokenizer: Any, prompts: list[Messages], preset: Preset, seed: int,
    log: BatchLog, ranks: Ranks, stats: GenerationStats, progress: bool,
) -> None:
    """Generate this rank's batches of the stage that neither the log nor this rank's shard holds yet: into the log
    itself in one process, into the rank's shard with several. Every rank plans all the batches (with the batch's
    position in the plan as its seed, `generate.plan_batches`) and skips the others', so each batch is sampled
    exactly as one process samples it."""
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    stage_seed = seed * 10 + {"positive": 1, "negative": 2}[stage]
    out = log if ranks.size == 1 else BatchLog(shard_path(log.path, ranks.rank))
    n_batches = math.ceil(len(ids) / preset.gen_batch_size)
    others = set(range(n_batches)) - ranks.share(n_batches)
    for batch, texts, cut in generate_reply_batches(
        model, tokenizer, ids,
        max_new_tokens=preset.max_new_tokens, temperature=preset.temperature, top_p=preset.top_p,
        batch_size=preset.gen_batch_size, seed=stage_seed,
        skip_batches=log.finished(stage) | out.finished(stage) | others,
        stats=stats, progress=progress, desc=f"{stage} responses",
    ):
        out.append(stage, batch.index, batch.rows, texts, cut)


def _sample(
    stage: str, model: Any, tokenizer: Any, prompts: list[Messages], preset: Preset, seed: int,
    log_path: Path, ranks: Ranks, stats: GenerationStats, progress: bool,
) -> tuple[list[str], list[bool]]:
    """The stage's responses in prompt order (and their cut-off flags), each rank generating its share; rank 0 then
    merges the shards into the log (`BatchLog.absorb`) and every rank reads the merged log."""
    log = BatchLog(log_path, repair=ranks.main)
    _generate_share(stage, model, tokenizer, prompts, preset, seed, log, ranks, stats, progress)
    ranks.barrier()
    if ranks.main:  # in one process too: a killed run of several leaves shards this one has to take in
        log.absorb(sorted(log_path.parent.glob(SHARD_GLOB)))
    ranks.barrier()
    merged = log if ranks.main else BatchLog(log_path, repair=False)
    return merged.replies(stage, len(prompts))


def _combined(parts: Sequence[GenerationStats]) -> GenerationStats:
    """The ranks' generation bookkeeping as one: tokens and batches summed, seconds those of the slowest rank (the
    ranks generate side by side, so the throughput is all tokens over that time)."""
    return GenerationStats(new_tokens=sum(p.new_tokens for p in parts), seconds=max(p.seconds for p in parts),
                           batches=sum(p.batches for p in parts))


def score_plan(tokens: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int) -> list[list[int]]:
    """The batches `scoring.completion_logprobs` cuts from these (prompt, completion) token pairs: longest first,
    `batch_size` at a time. A row's log-prob depends (in the last bits) on the padding of its batch, so the ranks
    score exactly these batches and the result equals one process's bit for bit."""
    order = sorted(range(len(tokens)), key=lambda i: -(len(tokens[i][0]) + len(tokens[i][1])))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def score_share(
    model: Any, tokenizer: Any, prompts: Sequence[Messages], responses: Sequence[str], batches: Sequence[list[int]],
    max_length: int, *, progress: bool = False, desc: str = "scoring",
) -> dict[int, float]:
    """Summed log pi(response | prompt) of the rows of `batches`, each batch scored as one (`sequence_logprobs`)."""
    from tqdm.auto import tqdm

    out: dict[int, float] = {}
    with tqdm(total=sum(map(len, batches)), desc=desc, disable=not progress, unit="seq") as bar:
        for rows in batches:
            sums, _ = sequence_logprobs(model, tokenizer, [prompts[r] for r in rows], [responses[r] for r in rows],
                                        max_length=max_length, batch_size=len(rows))
            out.update(zip(rows, sums.tolist()))
            bar.update(len(rows))
    return out


def _score(
    model: Any, tokenizer: Any, prompts: Sequence[Messages], responses: Sequence[str], preset: Preset, ranks: Ranks,
    progress: bool, desc: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probs and completion token counts of every pair (`sequence_logprobs`), each rank scoring its
    share of the batches (a collective: every rank calls it)."""
    tokens = [pair_tokens(tokenizer, p, r, preset.max_length) for p, r in zip(prompts, responses)]
    plan = score_plan(tokens, preset.score_batch_size)
    mine = [plan[b] for b in sorted(ranks.share(len(plan)))]
    share = score_share(model, tokenizer, prompts, responses, mine, preset.max_length, progress=progress, desc=desc)
    merged = {row: value for part in ranks.all_gather(share) for row, value in part.items()}
    return np.array([merged[i] for i in range(len(tokens))], dtype=np.float64), np.array([len(c) for _, c in tokens])


def _prepare_folder(pairs_path: Path, manifest_path: Path, log_path: Path, key: cache.Key, gen_key: cache.Key,
                    redo: bool) -> None:
    """Before (re)making the pairs (on the main process only): clear what `redo` or other generation settings make
    stale, shards of several processes included, and mark the log as this generation key's, so its finished batches
    (and the shards') are resumed."""
    shards = sorted(log_path.parent.glob(SHARD_GLOB))
    if redo:
        for p in (pairs_path, manifest_path, log_path, cache.key_file(pairs_path), cache.key_file(log_path), *shards):
            p.unlink(missing_ok=True)
    cache.prepare(pairs_path, key)  # says why they are (re)made; the pairs file is replaced below
    if (log_path.exists() or shards) and not cache.reuse(log_path, gen_key) and cache.prepare(log_path, gen_key):
        for p in (log_path, *shards):  # a partial generation of other settings: start afresh
            p.unlink(missing_ok=True)
    cache.store(log_path, gen_key)  # the resume marker: finished batches below belong to this key


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
    split: str = "train",
) -> list[dict[str, Any]]:
    """Generate, pair, score and store the MIPO pairs of one seed; reuse them when they already exist. With
    `split="validation"`, the shared validation pairs instead (`split_examples`; sampled with `VALIDATION_SEED`
    whatever `seed` is), by the same code and sampling settings as the training pairs.

    Under torch.distributed every rank calls it: each generates and scores its share, rank 0 writes the pairs and
    the others read them back (see the module docstring)."""
    if preset.negative not in NEGATIVES:
        raise MipoError(f"unknown negative {preset.negative!r}; choose one of: {', '.join(NEGATIVES)}")
    if preset.negative != "random_prompt" and not task.conditional:
        raise MipoError(f"task {task.name!r} has no context to drop or swap; use negative='random_prompt'")
    gen_key, key = generation_key(preset, seed, task, split), pairs_key(preset, seed, task, split)
    folder = pairs_dir(preset, seed, task, split)
    pairs_path, manifest_path, log_path = folder / "pairs.jsonl", folder / "manifest.json", folder / "responses.jsonl"
    ranks = Ranks.current()
    examples = split_examples(task, preset, seed, split)
    seed = _split_seed(seed, split)
    if not redo and cache.reuse(pairs_path, key):  # every rank decides alike: nothing finishes pairs before the barrier
        return judged_pairs(task, examples, load_pairs(pairs_path))
    if ranks.main:
        _prepare_folder(pairs_path, manifest_path, log_path, key, gen_key, redo)
    ranks.barrier()  # the folder is ready (or cleared) before any rank reads its log
    positives_prompts = [task.prompt(e) for e in examples]
    # on a GPU: stop before sampling if the batch cannot fit, or say that a larger one could (the negatives' prompts
    # are the positives' without the context, or other examples' of the same task: no longer)
    longest = max((len(chat_prompt_ids(tokenizer, p)) for p in positives_prompts), default=0)
    hint = check_gen_batch(model, preset.gen_batch_size, longest, preset.max_new_tokens)
    if hint and ranks.main and progress:
        print(hint)

    rng = np.random.default_rng(seed)
    stats = GenerationStats()
    started = time.perf_counter()
    progress = progress and ranks.main
    positives, positives_cut = _sample("positive", model, tokenizer, positives_prompts, preset, seed, log_path, ranks,
                                       stats, progress)

    # (example index, negative prompt x', negative response y-) for every pair
    k = preset.k_negatives
    if preset.negative == "context_drop":
        neg_prompts = [task.prompt(e, with_context=False) for e in examples for _ in range(k)]
        negatives, negatives_cut = _sample("negative", model, tokenizer, neg_prompts, preset, seed, log_path, ranks,
                                           stats, progress)
        triples = [(i, neg_prompts[i * k + j], negatives[i * k + j], "context_drop", negatives_cut[i * k + j])
                   for i in range(len(examples)) for j in range(k)]
    else:
        sources = negative_sources(examples, preset.negative, k, rng)
        triples = [(i, positives_prompts[s], positives[s], examples[s].id, positives_cut[s])
                   for i in range(len(examples)) for s in sources[i]]
    per_process = ranks.all_gather(stats)  # what each rank generated in this run
    stats = _combined(per_process)
    gen_seconds = time.perf_counter() - started

    # Four scores per pair: both responses under x (reference log-probs) and under x' (for the PMI).
    score_start = time.perf_counter()
    xs = [positives_prompts[i] for i, *_ in triples]
    x_negs = [t[1] for t in triples]
    ys_pos = [positives[i] for i, *_ in triples]
    ys_neg = [t[2] for t in triples]
    lp_pos_x, n_pos = _score(model, tokenizer, xs + x_negs, ys_pos + ys_pos, preset, ranks, progress, "scoring positives")
    lp_neg_x, n_neg = _score(model, tokenizer, xs + x_negs, ys_neg + ys_neg, preset, ranks, progress, "scoring negatives")
    if not ranks.main:
        ranks.barrier()  # rank 0 writes the pairs
        return judged_pairs(task, examples, load_pairs(pairs_path))
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
        "generated_batches_by_process": [part.batches for part in per_process],
        "generation_seconds": round(gen_seconds, 2),
        "generation_tokens_per_s": round(stats.tokens_per_s, 2),
        "scoring_seconds": round(score_seconds, 2),
        "scored_tokens": int(n_pos.sum() + n_neg.sum()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    files.write_text(manifest_path, json.dumps(manifest, indent=2))
    cache.store(pairs_path, key)  # last: the pairs count as finished only once pairs and manifest are written
    ranks.barrier()  # the other ranks read the pairs now
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


def cached_pairs(preset: Preset, seed: int, split: str = "train") -> list[dict[str, Any]] | None:
    """The finished pairs of a seed (or the validation pairs) made with these settings (no model needed), judged now;
    None if there are none."""
    path = pairs_dir(preset, seed, split=split) / "pairs.jsonl"
    if not cache.reuse(path, pairs_key(preset, seed, split=split)):
        return None
    task = get_task(preset.task)
    return judged_pairs(task, split_examples(task, preset, seed, split), load_pairs(path))


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
