"""Sequence log-probabilities log pi(y|x) under a model, tokenized exactly as TRL's DPOTrainer tokenizes pairs.

These numbers serve twice: as the base model's pointwise mutual information diagnostics of each pair
(log pi0(y|x) - log pi0(y|x')) and as DPO's reference log-probs, which the trainer then reads instead of running a
reference forward pass every step. That reuse is only correct if the tokens are the same ones TRL trains on, so the
tokenization below mirrors TRL's conversational path: prompt = chat template with the generation header,
completion = the rest of (prompt + assistant message) after their common prefix, truncated to `max_length` from the
start (TRL's default `keep_start`). `dpo.check_reference_tokens` verifies the match at training time.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from mipo_lib.generate import Messages, chat_prompt_ids


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pair_tokens(tokenizer: Any, prompt: Messages, response: str, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) for a response to a chat prompt, as TRL's DPO/SFT tokenization makes them."""
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    cut = _common_prefix(prompt_ids, full)
    prompt_ids, completion = prompt_ids[:cut], full[cut:]
    if max_length is not None and len(prompt_ids) + len(completion) > max_length:
        completion = completion[: max(0, max_length - len(prompt_ids))]
    return prompt_ids, completion


def sequence_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Messages],
    responses: Sequence[str],
    *,
    max_length: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "scoring",
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log pi(response | prompt) for each pair, and the number of completion tokens scored.

    Batches are length-sorted and right-padded; only completion positions enter the sum.
    """
    from tqdm.auto import tqdm

    tokens = [pair_tokens(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    lengths = np.array([len(c) for _, c in tokens])
    order = sorted(range(len(tokens)), key=lambda i: -(len(tokens[i][0]) + len(tokens[i][1])))
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    out = np.zeros(len(tokens), dtype=np.float64)
    bar = tqdm(total=len(tokens), desc=desc, disable=not progress, unit="seq")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        seqs = [tokens[r][0] + tokens[r][1] for r in rows]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        completion = torch.zeros_like(input_ids, dtype=torch.bool)
        for i, r in enumerate(rows):
            p, c = tokens[r]
            input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            attention[i, : len(p) + len(c)] = 1
            completion[i, len(p) : len(p) + len(c)] = True
        input_ids, attention, completion = input_ids.to(device), attention.to(device), completion.to(device)
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
            targets = input_ids[:, 1:]
            token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            sums = (token_logps * completion[:, 1:]).sum(dim=1)
        out[rows] = sums.double().cpu().numpy()
        bar.update(len(rows))
    bar.close()
    return out, lengths
