"""Evaluation on held-out prompts: every method's responses, scored by the task's judge, as per-example records.

Methods are the entries of `mipo_lib.methods` (display names used in tables and figures):
- `base (no context)`: the base model without the user's context (what the user gets if nobody personalizes);
- `prompting`: the base model with the context in the prompt, no training (the paper's main baseline);
- `SFT` / `MIPO`: the base model plus a trained LoRA adapter, prompted with the context;
- `CAD`: context-aware decoding, MIPO's decode-time twin: next-token scores (1+a) log p(y|x,c) - a log p(y|x) with
  a = 1/beta, implemented as a transformers logits processor that runs the context-free prompt alongside.
Decoding is greedy, so untrained methods are deterministic and evaluated once; trained methods once per seed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from mipo_lib import cache
from mipo_lib.config import Preset
from mipo_lib.generate import Batch, Messages, chat_prompt_ids, generate_batches
from mipo_lib.scoring import sequence_logprobs
from mipo_lib.tasks.base import Example, Task, judge_or_nan


class ContextAwareDecoding:
    """Logits processor: (1 + a) * log p(.|x, c) - a * log p(.|x), the context-free stream kept with its own cache.

    `uncond_ids` are the context-free prompts of the batch's rows, in the batch's order. The first call encodes them;
    each later call feeds the token chosen at the previous step, so the cost is one extra forward per token.
    """

    def __init__(self, model: Any, uncond_ids: Sequence[Sequence[int]], pad_id: int, alpha: float) -> None:
        self.model, self.alpha, self.pad_id = model, alpha, pad_id
        width = max(len(r) for r in uncond_ids)
        device = next(model.parameters()).device
        self.input_ids = torch.full((len(uncond_ids), width), pad_id, dtype=torch.long, device=device)
        self.mask = torch.zeros_like(self.input_ids)
        for i, r in enumerate(uncond_ids):
            self.input_ids[i, width - len(r) :] = torch.tensor(r, device=device)
            self.mask[i, width - len(r) :] = 1
        self.cache: Any = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
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


def generate_responses(
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
) -> list[str]:
    """Greedy responses to the examples' prompts (with CAD when `cad_alpha` is given)."""
    from transformers import LogitsProcessorList

    prompt_ids = [chat_prompt_ids(tokenizer, task.prompt(e, with_context=with_context)) for e in examples]
    factory = None
    if cad_alpha is not None:
        uncond = [chat_prompt_ids(tokenizer, task.prompt(e, with_context=False)) for e in examples]

        def factory(batch: Batch) -> Any:
            return LogitsProcessorList([ContextAwareDecoding(model, [uncond[r] for r in batch.rows], tokenizer.pad_token_id, cad_alpha)])

    out = [""] * len(examples)
    for batch, texts in generate_batches(
        model, tokenizer, prompt_ids, max_new_tokens=preset.eval_max_new_tokens, temperature=0.0,
        batch_size=preset.eval_batch_size, logits_processor_factory=factory, progress=progress, desc=desc,
    ):
        for row, text in zip(batch.rows, texts):
            out[row] = text
    return out


def records(task: Task, examples: Sequence[Example], responses: Sequence[str], method: str, seed: int) -> pd.DataFrame:
    """Per-example rows: task, method, seed, example_id, group, response, score, n_words."""
    return pd.DataFrame({
        "task": task.name,
        "method": method,
        "seed": seed,
        "example_id": [e.id for e in examples],
        "group": [task.group(e) for e in examples],
        "response": list(responses),
        "score": [judge_or_nan(task, e, r) for e, r in zip(examples, responses)],
        "n_words": [len(r.split()) for r in responses],
    })


def evaluate_cached(path: Path, make: Callable[[], pd.DataFrame], redo: bool = False, key: cache.Key | None = None) -> pd.DataFrame:
    """Read a finished table stored under `key`, or build it with `make()`, write it atomically and store the key.

    Without a `key`, the file name must carry everything the table depends on (the ablations name theirs by the
    adapter's keyed folder): the key is then the name alone. JSON Lines, not CSV: responses are arbitrary text
    (carriage returns, quotes, bytes from a random smoke model), and JSON round-trips every one of them exactly with
    the column types intact (floats with 15 digits).
    """
    path = Path(path)
    key = key or cache.Key("named", path.name, {})
    if not redo and cache.reuse(path, key):
        return _read_records(path)
    cache.prepare(path, key)
    frame = make()
    with cache.atomic(path) as tmp:
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
JUDGE_RUBRIC = (
    "You are judging how well a response fits a user's stated preferences.\n"
    "User preferences: {context}\nUser prompt: {request}\nResponse: {response}\n\n"
    "On a scale from 1 (ignores the preferences) to 5 (fully respects them and answers the prompt well), "
    "how well does the response fit? Answer with 'Score: N' and nothing else."
)


def parse_judge_score(text: str) -> int | None:
    """The 1-5 score in a judge's reply ('Score: 4', '4/5', 'I would give it a 4'), or None if there is none."""
    match = re.search(r"score\s*[:=]?\s*([1-5])\b", text, flags=re.IGNORECASE) or re.search(r"(?<![\d.])([1-5])(?![\d.])", text)
    return int(match.group(1)) if match else None


def llm_judge_scores(
    judge_model: Any, judge_tokenizer: Any, examples: Sequence[Example], responses: Sequence[str], preset: Preset, progress: bool = True
) -> list[int | None]:
    """Scores 1-5 from an LLM judge with the official-style rubric (None when the judge's reply has no score)."""
    prompts = [
        [{"role": "user", "content": JUDGE_RUBRIC.format(context=e.context or "(none)", request=e.request, response=r)}]
        for e, r in zip(examples, responses)
    ]
    ids = [chat_prompt_ids(judge_tokenizer, p) for p in prompts]
    out: list[int | None] = [None] * len(examples)
    for batch, texts in generate_batches(
        judge_model, judge_tokenizer, ids, max_new_tokens=8, temperature=0.0, batch_size=preset.eval_batch_size,
        progress=progress, desc="judging",
    ):
        for row, text in zip(batch.rows, texts):
            out[row] = parse_judge_score(text)
    return out
