"""Sequence log-probabilities log pi(y|x) under a model, tokenized exactly as TRL's DPOTrainer tokenizes pairs.

These numbers serve twice: as the base model's pointwise mutual information diagnostics of each pair
(log pi0(y|x) - log pi0(y|x')) and as DPO's reference log-probs, which the trainer then reads instead of running a
reference forward pass every step. That reuse is only correct if the tokens are the same ones TRL trains on, so the
tokenization below mirrors TRL's conversational path: prompt = chat template with the generation header,
completion = the rest of (prompt + assistant message) after their common prefix, truncated to `max_length` from the
start (TRL's default `keep_start`). `dpo.check_reference_tokens` verifies the match at training time.

`sampled_kl` scores sampled tokens the same way: the Monte-Carlo KL between two models is a difference of two
`completion_logprobs` of exactly the token ids one of them sampled.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from mipo_lib.generate import Messages, chat_prompt_ids, decode_reply, eos_ids, sample_token_ids


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


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., target] in fp32, one sequence at a time, without a full fp32 copy of the batch.

    A plain `log_softmax(logits.float())` materialises two fp32 tensors of batch x length x vocabulary: with
    Qwen2.5's 151,936-token vocabulary and the `t4` preset's score batch (8 x 1,024 tokens) that is ~5 GB each, more
    than a T4 has next to the model. Here only one row (length x vocabulary) is upcast at a time, and the
    log-normaliser is a logsumexp, so the peak beyond the model's own logits is about two rows in fp32. The values
    equal the full log-softmax's (same fp32 arithmetic). TRL's `selective_log_softmax` follows the same idea.
    """
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for i in range(logits.shape[0]):
        row = logits[i].float()
        out[i] = row.gather(-1, targets[i].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1)
        del row
    return out


def _supports_logits_to_keep(model: Any) -> bool:
    """Whether `model.forward` takes `logits_to_keep` (transformers' causal LMs do; PEFT wrappers pass it on)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def completion_logprobs(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    *,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "scoring",
) -> np.ndarray:
    """Summed log model(completion | prompt) of exactly these token ids: every place that scores tokens calls this.

    Batches are length-sorted (longest first, so an out-of-memory error shows at once) and right-padded; only the
    completion positions enter the sum. Memory stays bounded: the model computes logits only from the earliest
    completion position of the batch on (`logits_to_keep`: a long prompt costs no vocabulary-sized logits), and
    `selective_log_softmax` upcasts one row at a time.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    keep_supported = _supports_logits_to_keep(model)
    out = np.zeros(len(prompt_ids), dtype=np.float64)
    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) + len(completion_ids[i])))
    bar = tqdm(total=len(order), desc=desc, disable=not progress, unit="seq")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompt_ids[r]) + len(completion_ids[r]) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        completion = torch.zeros_like(input_ids, dtype=torch.bool)
        for i, r in enumerate(rows):
            n_p, n_c = len(prompt_ids[r]), len(completion_ids[r])
            input_ids[i, : n_p + n_c] = torch.tensor(list(prompt_ids[r]) + list(completion_ids[r]), dtype=torch.long)
            attention[i, : n_p + n_c] = 1
            completion[i, n_p : n_p + n_c] = True
        # the logit at position t predicts token t + 1: keep positions first - 1 .. width - 2
        first = max(1, min(len(prompt_ids[r]) for r in rows))
        keep = width - first + 1
        input_ids, attention, completion = input_ids.to(device), attention.to(device), completion.to(device)
        kwargs = {"logits_to_keep": keep} if keep_supported else {}
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False, **kwargs).logits
            logits = logits[:, -keep:-1]  # predictions of tokens first .. width - 1
            token_logps = selective_log_softmax(logits, input_ids[:, first:])
            del logits
            sums = (token_logps * completion[:, first:]).sum(dim=1)
        out[rows] = sums.double().cpu().numpy()
        bar.update(len(rows))
    bar.close()
    return out


def token_digest(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> str:
    """A short fingerprint of the exact tokens a reference log-prob was computed on.

    Stored with each pair and compared by `dpo.check_reference_tokens` against the tokens TRL trains on: equal
    counts are not enough (a chat template that renders the date changes the prompt, not its length).
    """
    text = ",".join(map(str, prompt_ids)) + "|" + ",".join(map(str, completion_ids))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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

    Tokenized as TRL tokenizes a pair (`pair_tokens`), scored by `completion_logprobs`.
    """
    tokens = [pair_tokens(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    lengths = np.array([len(c) for _, c in tokens])
    sums = completion_logprobs(
        model, [p for p, _ in tokens], [c for _, c in tokens], tokenizer.pad_token_id,
        batch_size=batch_size, progress=progress, desc=desc,
    )
    return sums, lengths


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
    lp_pol = completion_logprobs(policy, ids, completions, tokenizer.pad_token_id, batch_size=score_bs)
    lp_ref = completion_logprobs(reference, ids, completions, tokenizer.pad_token_id, batch_size=score_bs)
    eos = eos_ids(policy, tokenizer)
    return pd.DataFrame({"response": [decode_reply(tokenizer, c, eos) for c in completions], "logp_policy": lp_pol,
                         "logp_base": lp_ref, "n_tokens": [len(c) for c in completions], "kl": lp_pol - lp_ref})
