"""Batched sampling with the chat template: the engine behind pair generation and evaluation.

Speed comes from generating many prompts at once: prompts are sorted by length (so a batch wastes few pad tokens),
left-padded (so every row's next token sits in the last column), and decoded with the KV cache. Batches are fixed by
that sort and each batch draws from its own seed, so a run interrupted after batch b and resumed gives the same
responses as an uninterrupted one: finished batches are skipped, not regenerated.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from mipo_lib.errors import MipoError

Messages = list[dict[str, str]]


# Llama 3.x templates print "Today Date: <strftime_now(...)>" into every system header; this is their own fallback.
TEMPLATE_DATE = datetime.date(2024, 7, 26)
_STRFTIME_CALL = re.compile(r"""strftime_now\(\s*(['"])(.*?)\1\s*\)""")


def pin_chat_template_date(tokenizer: Any, date: datetime.date = TEMPLATE_DATE) -> Any:
    """Replace every `strftime_now("<fmt>")` in the tokenizer's chat template with that date, formatted (in place).

    Some templates (Llama 3.x) render today's date into each prompt. Pairs are tokenized and scored under the base
    model on one day and trained on another, and the stored reference log-probs are only valid for the same tokens:
    a run that crosses midnight would silently train against log-probs of different prompts. Pinning the date makes
    prompts a function of the data alone. A template that calls `strftime_now` with a non-literal format cannot be
    pinned and fails here rather than drifting later.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "strftime_now" not in template:
        return tokenizer
    pinned = _STRFTIME_CALL.sub(lambda m: json.dumps(date.strftime(m.group(2))), template)
    if "strftime_now" in pinned:
        raise MipoError(
            "the chat template calls strftime_now with a non-literal format, so its date cannot be pinned; "
            "set tokenizer.chat_template to a copy with a fixed date string"
        )
    tokenizer.chat_template = pinned
    return tokenizer


def chat_prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of a conversation rendered with the chat template, ending with the assistant header."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@dataclass
class Batch:
    """One fixed batch of a generation plan: positions in the caller's prompt list and the batch's seed."""

    index: int
    rows: list[int]
    seed: int


@dataclass
class GenerationStats:
    """Throughput bookkeeping: new tokens (up to and including EOS) and seconds spent in `generate`."""

    new_tokens: int = 0
    seconds: float = 0.0
    batches: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else float("nan")


def plan_batches(prompt_ids: Sequence[Sequence[int]], batch_size: int, seed: int) -> list[Batch]:
    """Sort prompts by length (longest first: an OOM shows up at once) and cut fixed, seeded batches."""
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    return [
        Batch(index=b, rows=order[start : start + batch_size], seed=seed * 1_000_003 + b)
        for b, start in enumerate(range(0, len(order), batch_size))
    ]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of rows padded on the left, so every row's next token is the last column."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention[i, width - len(r) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends a reply: the generation config's end-of-sequence id(s) (chat models often list
    several, e.g. `<|im_end|>` and `<|endoftext|>`) and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}


def _through_first_eos(row: list[int], eos: set[int]) -> list[int]:
    """New tokens up to and including the first end-of-sequence token (all of them if none ended the reply)."""
    cut = next((i for i, t in enumerate(row) if t in eos), None)
    return row if cut is None else row[: cut + 1]


def hit_cap(token_ids: Sequence[int], eos: set[int], max_new_tokens: int) -> bool:
    """Whether a reply was cut off: it used all `max_new_tokens` and no end-of-sequence token closed it."""
    return len(token_ids) >= max_new_tokens and (not token_ids or token_ids[-1] not in eos)


def decode_reply(tokenizer: Any, token_ids: Sequence[int], eos: set[int]) -> str:
    """A reply's text from its new tokens, without the end-of-sequence token that closed it."""
    kept = token_ids[:-1] if token_ids and token_ids[-1] in eos else token_ids
    return str(tokenizer.decode(list(kept), skip_special_tokens=True)).strip()


def generate_token_batches(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    skip_batches: set[int] | None = None,
    logits_processor_factory: Callable[[Batch, list[list[int]]], Any] | None = None,
    stats: GenerationStats | None = None,
    progress: bool = True,
    desc: str = "generating",
    no_repeat_ngram_size: int = 0,
    batch_new_tokens: int = 0,
) -> Iterator[tuple[Batch, list[list[int]]]]:
    """Yield (batch, new token ids of each row, up to and including the first end-of-sequence token) for each batch
    of the plan not in `skip_batches`.

    `temperature == 0` means greedy decoding; sampling uses the model's own distribution at that temperature with
    nucleus `top_p` and never top-k (a generation config's default top-k would silently truncate it).
    `logits_processor_factory(batch, prefixes)` may return a transformers `LogitsProcessorList` for that batch, whose
    rows have already generated `prefixes` (empty lists at first; context-aware decoding uses it to bring its second
    context). `no_repeat_ngram_size` > 0 forbids repeating an n-gram of that length (transformers' own processor; 0
    leaves decoding untouched).

    `batch_new_tokens` (0: off) bounds how far a batch decodes all its rows together: rows still unfinished then
    continue on their own, from their prompt and what they generated so far, up to `max_new_tokens`. Why: `generate`
    keeps decoding every row of a batch until its longest reply ends, so one runaway reply among a hundred makes all
    of them pay for the whole cap; with the split a high cap costs only the replies that need it. Greedy rows come
    out as one uninterrupted decode would give them (the n-gram rule and the processors see the same tokens; only
    the batch's padding, hence float rounding, differs for the continued rows).
    """
    from tqdm.auto import tqdm

    skip_batches = skip_batches or set()
    plan = plan_batches(prompt_ids, batch_size, seed)
    todo = [b for b in plan if b.index not in skip_batches]
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id
    eos = eos_ids(model, tokenizer)
    sampling = temperature > 0
    bar = tqdm(total=sum(len(b.rows) for b in todo), desc=desc, disable=not progress, unit="prompt")
    if batch_new_tokens < 0:
        raise MipoError(f"batch_new_tokens must be >= 0 (0: off), not {batch_new_tokens}")
    stages = [batch_new_tokens, max_new_tokens] if 0 < batch_new_tokens < max_new_tokens else [max_new_tokens]
    common: dict[str, Any] = dict(do_sample=sampling, pad_token_id=pad_id, use_cache=True)
    if no_repeat_ngram_size > 0:
        common["no_repeat_ngram_size"] = no_repeat_ngram_size
    if sampling:
        common.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        common.update(temperature=None, top_p=None, top_k=None)

    def run(sub: Batch, prefixes: list[list[int]], budget: int) -> list[list[int]]:
        """New tokens of each row of `sub` after its prefix, for at most `budget` more tokens."""
        enc = left_pad([prompt_ids[r] + p for r, p in zip(sub.rows, prefixes)], pad_id, device)
        kwargs = {**common, "max_new_tokens": budget}
        if logits_processor_factory is not None:
            kwargs["logits_processor"] = logits_processor_factory(sub, prefixes)
        torch.manual_seed(sub.seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        if stats is not None:
            stats.seconds += time.perf_counter() - start
        return [_through_first_eos(row, eos) for row in out[:, enc["input_ids"].shape[1] :].tolist()]

    for batch in todo:
        rows = run(batch, [[] for _ in batch.rows], stages[0])
        going = [i for i, row in enumerate(rows) if hit_cap(row, eos, stages[0])]
        if len(stages) > 1 and going:
            # a fresh seed for the continuation: a sampled tail must not replay the batch's random stream
            sub = Batch(index=batch.index, rows=[batch.rows[i] for i in going], seed=batch.seed + 2**31)
            for i, tail in zip(going, run(sub, [rows[i] for i in going], stages[1] - stages[0])):
                rows[i] = rows[i] + tail
        if stats is not None:
            stats.new_tokens += sum(map(len, rows))
            stats.batches += 1
        bar.update(len(batch.rows))
        yield batch, rows
    bar.close()


def generate_reply_batches(
    model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, **kwargs: Any
) -> Iterator[tuple[Batch, list[str], list[bool]]]:
    """Yield (batch, decoded responses, whether each hit `max_new_tokens` before the model ended it) for each batch
    of the plan (options: `generate_token_batches`). The flag needs the token ids, which the text no longer has."""
    eos = eos_ids(model, tokenizer)
    for batch, rows in generate_token_batches(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, **kwargs):
        yield batch, [decode_reply(tokenizer, row, eos) for row in rows], [hit_cap(row, eos, max_new_tokens) for row in rows]


def generate_batches(
    model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], **kwargs: Any
) -> Iterator[tuple[Batch, list[str]]]:
    """Yield (batch, decoded responses) for each batch of the plan (options: `generate_token_batches`)."""
    for batch, texts, _ in generate_reply_batches(model, tokenizer, prompt_ids, **kwargs):
        yield batch, texts


def sample_token_ids(
    model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int = 16,
    seed: int = 0, progress: bool = False,
) -> list[list[int]]:
    """One reply per prompt sampled from the model's own distribution (temperature 1, no top-k, no top-p), as the
    generated token ids up to and including the first end-of-sequence token (or `max_new_tokens` tokens).

    Batches and seeds are those of `generate_batches`; unlike that function this keeps the token ids, so they can
    be scored exactly as sampled (decoding and re-encoding text can change them).
    """
    out: list[list[int]] = [[] for _ in prompt_ids]
    for batch, rows in generate_token_batches(
        model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
        batch_size=batch_size, seed=seed, progress=progress, desc="sampling from the policy",
    ):
        for row, ids in zip(batch.rows, rows):
            out[row] = ids
    return out


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Messages],
    **kwargs: Any,
) -> list[str]:
    """Responses to chat prompts, in the prompts' order (see `generate_batches` for the options)."""
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    out: list[str] = [""] * len(ids)
    for batch, texts in generate_batches(model, tokenizer, ids, **kwargs):
        for row, text in zip(batch.rows, texts):
            out[row] = text
    return out


def chat_reply(model: Any, tokenizer: Any, message: str, max_new_tokens: int = 64) -> str:
    """A single greedy reply: the quickest check that a model loads and talks."""
    return generate(model, tokenizer, [[{"role": "user", "content": message}]], max_new_tokens=max_new_tokens, progress=False)[0]
