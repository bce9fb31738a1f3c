"""A DPO batch's hidden states with each prompt run through the model once instead of twice.

Why: TRL lays a DPO batch out as 2n rows, `prompt + chosen` for the n pairs and then `prompt + rejected`, and runs
the whole prompt twice. A pair's two replies answer the same prompt (MIPO's negatives are scored under the
positive's prompt), so the prompt's keys and values are the same in both rows. On the `cpu` preset a prompt is about
62 tokens and a reply about 46, and 16% of a padded batch is padding: running the n prompts once, keeping their
keys and values, and then only the 2n replies on top cuts the tokens a step pushes through the transformer from about
1,050 to about 790 per batch (`benchmarks/results.md` has the measured step times).

The result is laid out exactly as TRL's backbone output (2n rows, right-padded, prompt then reply), so TRL's fused
LM head and its loss and metrics run unchanged. Only the positions TRL scores are exact copies of the full forward:
the last prompt token's state (it predicts the first reply token) and the reply tokens' states; other prompt
positions carry the prompt pass's states, padding is zero. `tests/test_shared_prompt.py` checks log-probs, loss and
LoRA gradients against TRL's own forward.

A batch that does not have this shape (odd rows, rows i and n + i with different prompts, a reply cut to nothing, a
left-padded batch) returns None, and the caller runs the model as usual.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F


def pair_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(prompt lengths, reply lengths) of a TRL DPO batch if its rows i and n + i share their prompt, else None.

    Each row must be right-padded (attention mask a prefix of ones), its reply one block right after the prompt up to
    the last real token, and non-empty."""
    rows, width = input_ids.shape
    if rows % 2 or completion_mask.shape != input_ids.shape or attention_mask.shape != input_ids.shape:
        return None
    n = rows // 2
    mask, completion = attention_mask.bool(), completion_mask.bool()
    positions = torch.arange(width, device=input_ids.device)
    lengths = mask.sum(1)
    prompt_len = completion.long().argmax(1)
    reply_len = completion.sum(1)
    right_padded = torch.equal(mask, positions < lengths[:, None])
    one_block = torch.equal(completion, (positions >= prompt_len[:, None]) & (positions < lengths[:, None]))
    if not (right_padded and one_block and bool((reply_len > 0).all()) and torch.equal(prompt_len[:n], prompt_len[n:])):
        return None
    prompt_mask = positions < prompt_len[:n, None]
    if not torch.equal(input_ids[:n][prompt_mask], input_ids[n:][prompt_mask]):
        return None
    return prompt_len, reply_len


def hidden_states(
    backbone: Callable[..., Any], input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor | None:
    """The last hidden states TRL's backbone call would return for this batch, with each prompt run once, or None.

    `backbone` is the transformer body's forward (e.g. `LlamaModel.forward`): called twice, on the n prompts with a
    key/value cache, then on the 2n replies (chosen and rejected of a pair side by side) attending to that cache, with
    position ids that continue each prompt's."""
    layout = pair_layout(input_ids, attention_mask, completion_mask)
    if layout is None:
        return None
    prompt_len, reply_len = layout
    rows, width = input_ids.shape
    n, device = rows // 2, input_ids.device
    p_width, r_width = int(prompt_len.max()), int(reply_len.max())

    p_pos = torch.arange(p_width, device=device)
    prompt_mask = (p_pos < prompt_len[:n, None]).long()
    prompts = backbone(input_ids=input_ids[:n, :p_width], attention_mask=prompt_mask,
                       position_ids=p_pos.expand(n, -1), use_cache=True)
    cache = cache_of(prompts)
    cache.batch_repeat_interleave(2)  # cache row i serves reply rows 2i (chosen) and 2i + 1 (rejected)

    order = torch.stack([torch.arange(n, device=device), torch.arange(n, device=device) + n], 1).reshape(-1)
    r_pos = torch.arange(r_width, device=device)
    valid = r_pos < reply_len[order, None]
    positions = prompt_len[order, None] + r_pos  # each reply continues its prompt's positions
    replies = input_ids[order].gather(1, positions.clamp(max=width - 1)).masked_fill(~valid, 0)
    out = backbone(input_ids=replies, attention_mask=torch.cat([prompt_mask.repeat_interleave(2, 0), valid.long()], 1),
                   position_ids=positions, use_cache=True, **{cache_argument(backbone): cache})

    # Back to TRL's layout: rows in its order, each prompt's states then its reply's at positions prompt_len + r.
    back = torch.empty_like(order)
    back[order] = torch.arange(rows, device=device)
    reply_states = out.last_hidden_state[back] * valid[back, :, None]
    prompt_states = torch.cat([prompts.last_hidden_state] * 2) * prompt_mask.repeat(2, 1)[..., None]
    hidden = F.pad(prompt_states, (0, 0, 0, width + 1 - p_width))  # one spare column takes the padding's writes
    target = torch.where(valid[back], positions[back], width)
    hidden = hidden.scatter_add(1, target[..., None].expand(-1, -1, hidden.size(-1)), reply_states)
    return hidden[:, :width]


def cache_argument(backbone: Callable[..., Any]) -> str:
    """The name a model's (or body's) forward takes its key/value cache under: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name warns)."""
    return "cache" if "cache" in inspect.signature(backbone).parameters else "past_key_values"


def cache_of(output: Any) -> Any:
    """The key/value cache of a model's (or body's) output, under either name (see `cache_argument`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
