"""Evaluation on held-out prompts: every method's responses, scored by the task's judge, as per-example records.

Methods are the entries of `mipo_lib.methods` (display names used in tables and figures):
- `base (no context)`: the base model without the user's context (what the user gets if nobody personalizes);
- `prompting`: the base model with the context in the prompt, no training (the paper's main baseline);
- `SFT` / `MIPO`: the base model plus a trained LoRA adapter, prompted with the context;
- `CAD`: context-aware decoding, MIPO's decode-time twin: next-token scores (1+a) log p(y|x,c) - a log p(y|x) with
  a = 1/beta, implemented as a transformers logits processor that runs the context-free prompt alongside.
Decoding is greedy, so untrained methods are deterministic and evaluated once; trained methods once per seed.

Cached records hold the replies (and whether each hit the token cap), never a verdict: `cached_records` judges them
each time they are read, with the task's judge of the moment (a preference checker registered anew, an edited gold
answer), so a score can never be a stale one. Code judges are cheap; the LLM judge (PRISM) is not, so its scores are
cached under a key of everything that decides them (`judge_key`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from mipo_lib import cache, files
from mipo_lib import methods as registry
from mipo_lib.config import Preset
from mipo_lib.errors import MipoError
from mipo_lib.generate import (
    Batch, Messages, chat_prompt_ids, generate_batches, generate_reply_batches, left_pad,
)
from mipo_lib.scoring import sequence_logprobs
from mipo_lib.shared_prompt import cache_argument, cache_of
from mipo_lib.tasks import get_task
from mipo_lib.tasks.base import Example, Task, judge_or_nan


class ContextAwareDecoding:
    """Logits processor: (1 + a) * log p(.|x, c) - a * log p(.|x), the context-free stream kept with its own cache.

    `uncond_ids` are the context-free prompts of the batch's rows, in the batch's order. The first call encodes them;
    each later call feeds the token chosen at the previous step, so the cost is one extra forward per token.
    """

    def __init__(self, model: Any, uncond_ids: Sequence[Sequence[int]], pad_id: int, alpha: float) -> None:
        self.model, self.alpha, self.pad_id = model, alpha, pad_id
        enc = left_pad(uncond_ids, pad_id, next(model.parameters()).device)
        self.input_ids, self.mask = enc["input_ids"], enc["attention_mask"]
        self.cache: Any = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The next-token logits after `ids` (the whole prompts at first, then one token), extending the cache.

        Only the last position goes through the LM head (`logits_to_keep=1`, as `generate` does for the context
        stream): the first call would otherwise hold the whole vocabulary's logits for every prompt position, e.g.
        100 prompts x 50 tokens x 49,152 in fp32, 1 GB: CAD's peak on the cpu preset fell from 3.2 to 2.4 GB with this
        (benchmarks/results_stages.md)."""
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{cache_argument(self.model.forward): self.cache})
        self.cache = cache_of(out)
        return out.logits[:, -1, :].float()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.cache is None:
                uncond = self._forward(self.input_ids)
            else:
                last = input_ids[:, -1:]
                self.mask = torch.cat([self.mask, torch.ones_like(last)], dim=1)
                uncond = self._forward(last)
        cond = torch.log_softmax(scores.float(), dim=-1)
        return ((1 + self.alpha) * cond - self.alpha * torch.log_softmax(uncond, dim=-1)).to(scores.dtype)


def prompts_per_batch(preset: Preset, *, cad: bool) -> int:
    """How many prompts an evaluation batch decodes: `eval_batch_size`, or half of it with context-aware decoding.

    Why half: CAD runs every prompt twice, with the user's context and without (its `ContextAwareDecoding` processor
    keeps the context-free rows' own key/value cache), so half the prompts make the same number of rows, and the
    same memory, as any other method's batch. Measured on the `cpu` preset (fp32, 100 test prompts): CAD's stage
    peaked at 3.1 GB in the notebook kernel with 100 prompts a batch, 1.9 GB alone with 50, and its 100 replies were
    identical to the 100-prompt batch's. In bf16 a batch plan changes replies (docs/performance.md), so the plan is
    in CAD's cache key (`evaluation_key`).
    """
    return max(1, preset.eval_batch_size // 2) if cad else preset.eval_batch_size


def generate_replies(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    preset: Preset,
    *,
    with_context: bool = True,
    cad_alpha: float | None = None,
    progress: bool = True,
    desc: str = "evaluating",
) -> tuple[list[str], list[bool]]:
    """Greedy responses to the examples' prompts (with CAD when `cad_alpha` is given), and for each whether it hit
    the token cap (`eval_max_new_tokens`) before the model ended it: a truncated reply.

    `preset.eval_no_repeat_ngram` (when > 0) forbids repeating any n-gram of that length: greedy decoding of a small
    model otherwise loops ("- **Bacon:**" forty times) until the cap.

    Greedy decoding is a function of the prompt (with CAD, of the prompt and its context-free twin), so each distinct
    prompt is decoded once and its reply shared: without context, the ten preferences of a request are one prompt,
    and the base model's evaluation decodes a tenth of the rows.
    """
    from transformers import LogitsProcessorList

    def ids(e: Example, context: bool) -> tuple[int, ...]:
        return tuple(chat_prompt_ids(tokenizer, task.prompt(e, with_context=context)))

    # what decides a reply: the prompt's ids, with CAD also its context-free twin's
    keys = [(ids(e, with_context), ids(e, False) if cad_alpha is not None else ()) for e in examples]
    slot: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    row_of = [slot.setdefault(k, len(slot)) for k in keys]  # each example's distinct prompt
    distinct = list(slot)  # in first-seen order
    factory = None
    if cad_alpha is not None:

        def factory(batch: Batch, prefixes: list[list[int]]) -> Any:
            # a continued row's context-free stream carries the same reply so far as its context stream
            rows = [list(distinct[r][1]) + p for r, p in zip(batch.rows, prefixes)]
            return LogitsProcessorList([ContextAwareDecoding(model, rows, tokenizer.pad_token_id, cad_alpha)])

    texts, truncated = [""] * len(distinct), [False] * len(distinct)
    for batch, replies, cut in generate_reply_batches(
        model, tokenizer, [list(d[0]) for d in distinct], max_new_tokens=preset.eval_max_new_tokens, temperature=0.0,
        batch_size=prompts_per_batch(preset, cad=cad_alpha is not None), logits_processor_factory=factory,
        progress=progress, desc=desc,
        no_repeat_ngram_size=preset.eval_no_repeat_ngram, batch_new_tokens=preset.eval_batch_new_tokens,
    ):
        for row, text, hit in zip(batch.rows, replies, cut):
            texts[row], truncated[row] = text, hit
    return [texts[r] for r in row_of], [truncated[r] for r in row_of]


def generate_responses(model: Any, tokenizer: Any, task: Task, examples: Sequence[Example], preset: Preset, **kwargs: Any) -> list[str]:
    """The texts of `generate_replies` (options the same), for callers that do not judge completeness."""
    return generate_replies(model, tokenizer, task, examples, preset, **kwargs)[0]


def records(
    task: Task, examples: Sequence[Example], responses: Sequence[str], method: str, seed: int,
    truncated: Sequence[bool] | None = None,
) -> pd.DataFrame:
    """Per-example rows: task, method, seed, example_id, group, response, score, n_words, truncated (the reply hit
    the token cap; judges that a cut-off reply could fool fail it). Without `truncated`, no reply counts as cut off."""
    cut = [False] * len(responses) if truncated is None else [bool(t) for t in truncated]
    return pd.DataFrame({
        "task": task.name,
        "method": method,
        "seed": seed,
        "example_id": [e.id for e in examples],
        "group": [task.group(e) for e in examples],
        "response": list(responses),
        "score": [judge_or_nan(task, e, r, t) for e, r, t in zip(examples, responses, cut)],
        "n_words": [len(r.split()) for r in responses],
        "truncated": cut,
    })


def judged(frame: pd.DataFrame, task: Task, examples: Sequence[Example]) -> pd.DataFrame:
    """`frame` (records: `example_id`, `response`, `truncated`) with its `score` judged now by `task`'s judge (NaN for
    an LLM-judged task), in the column after `response`. A reply without a `truncated` flag counts as complete."""
    by_id = {e.id: e for e in examples}
    unknown = sorted(set(frame["example_id"]) - set(by_id))
    if unknown:
        raise MipoError(f"records of {len(unknown)} examples task {task.name!r} does not have (e.g. {unknown[0]!r}); "
                        "recompute them with redo=True")
    cut = frame["truncated"] if "truncated" in frame else pd.Series(False, index=frame.index)
    scores = [judge_or_nan(task, by_id[i], r, bool(t) if pd.notna(t) else False)
              for i, r, t in zip(frame["example_id"], frame["response"], cut)]
    out = frame.drop(columns="score", errors="ignore")
    out.insert(out.columns.get_loc("response") + 1, "score", scores)
    return out


def evaluation_key(
    preset: Preset, label: str, examples: Sequence[Example], adapter: cache.Key | None, *,
    method: str | None = None, stage: str | None = None, **extra: Any,
) -> cache.Key:
    """The key of every stage that measures a model on a task's prompts: a method's records (the pipeline's on the
    test split, `make tune`'s on the validation split) and the ablations' measurements of a trained policy (its KL to
    the base model, its generation cost).

    It holds the stage's declared preset fields (`cache.STAGE_FIELDS`), the values of `adapter` (the key of the
    trained adapter measured, built by its training stage; None for the base model), a digest of the prompts of
    `examples` (so also of their split) and `extra` (an epoch snapshot, a token cap, the number of timed repeats). A
    method's records (`method=`) add the method's definition (name, context or not, decoding) and read the
    "evaluation" stage's fields, or with context-aware decoding the "evaluation-cad" ones (its strength); another
    measurement names its `stage`. No judge is in it: records are judged on read (`cached_records`).
    """
    if (method is None) == (stage is None):
        raise MipoError("evaluation_key keys a method's records (method=...) or another measuring stage (stage=...); pass one")
    if method is not None:
        m = registry.get_method(method)
        if (m.training is None) != (adapter is None):
            raise MipoError(f"method {method!r} {'is' if m.training else 'is not'} trained: "
                            f"{'pass its adapter key' if m.training else 'pass adapter=None'}")
        stage = "evaluation-cad" if m.decoding == "cad" else "evaluation"
        extra = {"method": method, "with_context": m.with_context, "decoding": m.decoding, **extra}
        if m.decoding == "cad":
            extra["prompts_per_batch"] = prompts_per_batch(preset, cad=True)
    prompts = cache.prompts_digest(get_task(preset.task), examples)
    return cache.stage_key(stage, preset, label, upstream=adapter, prompts=prompts, **extra)


def cached_records(
    path: Path, key: cache.Key, make: Callable[[], pd.DataFrame], task: Task, examples: Sequence[Example],
    redo: bool = False,
) -> pd.DataFrame:
    """A method's records on `examples`: made by `make()` (a `records` table) or read back, stored as replies (every
    column but `score`) under `key`, and judged on every read (`judged`), the first one included, so a fresh and a
    cached call give the same table and a changed judge reaches cached replies."""
    return judged(evaluate_cached(path, lambda: make().drop(columns="score"), redo, key=key), task, examples)


def evaluate_cached(path: Path, make: Callable[[], pd.DataFrame], redo: bool = False, *, key: cache.Key) -> pd.DataFrame:
    """Read a finished table stored under `key`, or build it with `make()`, write it atomically and store the key.

    JSON Lines, not CSV: responses are arbitrary text (carriage returns, quotes, bytes from a random smoke model), and
    JSON round-trips every one of them exactly with the column types intact (floats with 15 digits).
    """
    path = Path(path)
    if not redo and cache.reuse(path, key):
        return _read_records(path)
    cache.prepare(path, key)
    frame = make()
    with files.atomic(path) as tmp:
        frame.to_json(tmp, orient="records", lines=True, force_ascii=False, double_precision=15)
    cache.store(path, key)
    return _read_records(path)  # what a later, cached call returns: the first call gives the very same numbers


def _read_records(path: Path) -> pd.DataFrame:
    return pd.read_json(path, lines=True, dtype=False, convert_dates=False)


def response_pmi(
    base_model: Any, tokenizer: Any, task: Task, examples: Sequence[Example], responses: Sequence[str], preset: Preset
) -> np.ndarray:
    """Base-model conditional PMI of each response: log pi0(y|x,c) - log pi0(y|x), in nats."""
    with_c: list[Messages] = [task.prompt(e) for e in examples]
    without: list[Messages] = [task.prompt(e, with_context=False) for e in examples]
    lp, _ = sequence_logprobs(
        base_model, tokenizer, with_c + without, list(responses) * 2,
        max_length=preset.max_length, batch_size=preset.score_batch_size,
    )
    return lp[: len(examples)] - lp[len(examples) :]


# ------------------------------------------------------------------------------------------------ LLM judge (PRISM)
# The official PRISM protocol (eval_scripts/prism.py of the official repository, lines 208-252): for each prompt and
# each of the user's stated preferences, one judge call; a system message asks for a 1-5 score, the user message holds
# the prompt, the response and that one preference; the first integer of the judge's sampled reply (temperature 0.1,
# top-p 0.9) is the score, a reply without one is skipped, and a response's score is the mean over the preferences.
# The reference is the dataset's chosen reply, scored the same way; win-or-tie = share of prompts with policy score
# >= reference score, strict win uses > (prism.py lines 97-100, 252).

#: The judge's system message, verbatim from prism.py line 213.
JUDGE_SYSTEM = (
    "You are a helpful assistant, that evaluates another assistant's response based on how well the response is "
    "personalized to this user based on their stated preference. Give a score between 1 and 5, 1 if the response is "
    "general, and 5 if the response sufficiently addresses the user's preference. Only respond with a number between "
    "1 and 5 and do not provide an explanation."
)
#: The judge's user message, verbatim from prism.py line 214 (`prompt` is the user's own prompt, without the template).
JUDGE_USER = "User: {prompt}\n\nAssistant: {response}\n\nUser's preference: {preference}"
#: The judge samples (prism.py lines 225-231).
JUDGE_TEMPERATURE, JUDGE_TOP_P = 0.1, 0.9
#: Enough for a number and a short preamble; the official cap is 1024 tokens, but the judge is told to answer with a
#: number only, and a batch ends as soon as every reply has.
JUDGE_MAX_NEW_TOKENS = 32
#: The official judges: Qwen2.5-14B-Instruct for Qwen policies, Llama-3-8B-Instruct for Llama ones (prism.py lines 24-27).
JUDGES = {"qwen": "Qwen/Qwen2.5-14B-Instruct", "llama": "meta-llama/Meta-Llama-3-8B-Instruct"}
#: The method name of the reference replies in judged records (the dataset's chosen reply).
REFERENCE = "reference"


def judge_messages(example: Example, response: str, preference: str) -> Messages:
    """The official judge call for one stated preference: system rubric, then prompt, response and preference."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_USER.format(prompt=example.request, response=response, preference=preference)},
    ]


def parse_judge_score(text: str) -> int | None:
    """The first integer in a judge's reply (`re.search(r"\\d+", ...)`, prism.py line 243), or None without one.

    One guard the official code lacks: an integer outside the rubric's 1-5 ("Score: 10", "0") is skipped like a reply
    without a number, rather than averaged in.
    """
    match = re.search(r"\d+", text)
    score = int(match.group()) if match else None
    return score if score is not None and 1 <= score <= 5 else None


def mean_judge_score(scores: Sequence[int | None]) -> float | None:
    """A response's score: the mean over the user's preferences of the parsed scores, skipping replies without one
    (prism.py lines 244-248); None when no reply had a score (the official `np.mean([])` is NaN, never a win)."""
    kept = [s for s in scores if s is not None]
    return float(np.mean(kept)) if kept else None


def llm_judge_scores(
    judge_model: Any, judge_tokenizer: Any, examples: Sequence[Example], responses: Sequence[str], preset: Preset,
    progress: bool = True, seed: int = 0,
) -> list[float | None]:
    """Each response's official PRISM score: one sampled judge call per stated preference (`meta["preferences"]`,
    else the example's context), the first integer of each reply, the mean over the preferences (None if none)."""
    calls = [
        (row, judge_messages(e, r, pref))
        for row, (e, r) in enumerate(zip(examples, responses))
        for pref in (e.meta.get("preferences") or [e.context or ""])
    ]
    ids = [chat_prompt_ids(judge_tokenizer, messages) for _, messages in calls]
    parsed: list[int | None] = [None] * len(calls)
    for batch, texts in generate_batches(
        judge_model, judge_tokenizer, ids, max_new_tokens=JUDGE_MAX_NEW_TOKENS, temperature=JUDGE_TEMPERATURE,
        top_p=JUDGE_TOP_P, batch_size=preset.eval_batch_size, seed=seed, progress=progress, desc="judging",
    ):
        for call, text in zip(batch.rows, texts):
            parsed[call] = parse_judge_score(text)
    per_response: list[list[int | None]] = [[] for _ in examples]
    for (row, _), score in zip(calls, parsed):
        per_response[row].append(score)
    return [mean_judge_score(scores) for scores in per_response]


def judge_for(policy_model_id: str) -> str:
    """The official judge of a policy: Qwen2.5-14B-Instruct for Qwen models, Llama-3-8B-Instruct otherwise."""
    return JUDGES["qwen"] if "qwen" in policy_model_id.lower() else JUDGES["llama"]


def judge_protocol() -> str:
    """Digest of how the judge is asked and sampled: its messages for a placeholder example (the template constants
    as they are filled in) and its sampling settings. Part of `judge_key`: a reworded rubric rescores."""
    probe = judge_messages(Example("probe", "{prompt}"), "{response}", "{preference}")
    return cache.content_digest([probe, JUDGE_TEMPERATURE, JUDGE_TOP_P, JUDGE_MAX_NEW_TOKENS])[:16]


def judge_key(
    preset: Preset, records: pd.DataFrame, examples: Sequence[Example], judge_id: str, judge_4bit: bool | None = None,
) -> cache.Key:
    """What the LLM judge's scores of `records` (`judge_records`) depend on: the "llm-judge" stage's fields (the
    judge loads in the preset's dtype and samples in its eval batches), the judge's id and whether it loads in 4 bits
    (`judge_4bit`, default the preset's `load_in_4bit`; the key's `judge_4bit` is what to load), the judge prompt and
    sampling (`judge_protocol`), what each example gives the judge (request, stated preferences, reference reply) and
    the records' replies."""
    inputs = [[e.id, e.request, e.meta.get("preferences") or [e.context or ""], e.meta.get("reference")] for e in examples]
    replies = records[["method", "seed", "example_id", "response"]].astype(str).values.tolist()
    return cache.stage_key(
        "llm-judge", preset, "LLM-judged records", judge=judge_id,
        judge_4bit=preset.load_in_4bit if judge_4bit is None else bool(judge_4bit), protocol=judge_protocol(),
        inputs=cache.content_digest(inputs)[:16], replies=cache.content_digest(replies)[:16],
    )


def judge_records(
    records: pd.DataFrame, examples: Sequence[Example], judge_model: Any, judge_tokenizer: Any, preset: Preset,
    progress: bool = True,
) -> pd.DataFrame:
    """`records` with `score` replaced by the official judge's score (NaN where skipped), plus the reference's rows
    (method `REFERENCE`, the dataset's chosen reply, once per seed of the records), ready for
    `stats.win_tie_table(judged, "MIPO", REFERENCE)`: win-or-tie and strict win with CIs."""
    by_id = {e.id: e for e in examples}
    missing = [e.id for e in examples if not e.meta.get("reference")]
    if missing:
        raise MipoError(f"{len(missing)} test prompts have no reference reply (e.g. {missing[0]!r}); give the records a chosen_response")
    first = records[records["seed"] == records["seed"].min()].drop_duplicates("example_id")
    ref = first.assign(method=REFERENCE, response=[by_id[i].meta["reference"] for i in first["example_id"]])
    ref = pd.concat([ref.assign(seed=s) for s in sorted(records["seed"].unique())], ignore_index=True)
    frame = pd.concat([records, ref], ignore_index=True)
    unique = frame.drop_duplicates(["example_id", "response"])
    scores = llm_judge_scores(
        judge_model, judge_tokenizer, [by_id[i] for i in unique["example_id"]], unique["response"].fillna("").tolist(),
        preset, progress=progress,
    )
    lookup = {(i, r): s for i, r, s in zip(unique["example_id"], unique["response"], scores)}
    judged = [lookup[(i, r)] for i, r in zip(frame["example_id"], frame["response"])]
    return frame.assign(score=[np.nan if s is None else s for s in judged], n_words=frame["response"].fillna("").str.split().str.len())
