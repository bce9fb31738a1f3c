"""How many prompts a GPU can decode together: the memory of batched generation, from the model's config.

Why: pair generation decodes `gen_batch_size` prompts at a time, and on a GPU batched decoding is limited by the
fixed cost of each decode step, not by arithmetic (measured on the H200: 698 generated tok/s against 23,992 tok/s of
teacher-forced scoring, `benchmarks/results_gpu.md`), so a larger batch is faster until memory runs out. What a
batch needs is known before it runs: its key/value cache (2 x layers x key/value heads x head size per token, for the
prompt and every new token), the prefill's largest transient (one layer's MLP over the prompt) and the sampling
buffers (full-vocabulary logits in fp32, softmax and the nucleus sort). `check_gen_batch` compares that with the
card's free memory before pairs are sampled: a batch that cannot fit stops with the value that does, and a card with
room for four times the batch says so in one line. The batch size stays the preset's (it seeds the sampling, so
another value samples other pairs): sizing it to a card is the user's explicit `--set gen_batch_size=N`.
A leaf module: torch and the library's errors only.
"""

from __future__ import annotations

from typing import Any

import torch

from mipo_lib.errors import MipoError

#: Share of the free memory a batch may plan to use: allocator fragmentation and the model's own temporaries take
#: the rest.
MARGIN = 0.8
#: A card with room for this many times the preset's batch gets a one-line hint (a faster run is a `--set` away).
HINT_FACTOR = 4


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of key/value cache one token of one row holds: keys and values of every layer's key/value heads."""
    c = _text_config(config)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * heads * head_dim * torch.empty((), dtype=dtype).element_size()


def decode_bytes(config: Any, rows: int, prompt_tokens: int, new_tokens: int, dtype: torch.dtype) -> int:
    """Memory a batch of `rows` prompts of `prompt_tokens` (the longest, left-padded) needs on top of the weights to
    generate `new_tokens` each: the cache at its largest, plus the larger of the prefill's transient (one layer's MLP
    and attention projections over the prompt) and the sampling buffers (three fp32 copies of the logits)."""
    c = _text_config(config)
    width = torch.empty((), dtype=dtype).element_size()
    cache = rows * (prompt_tokens + new_tokens) * kv_bytes_per_token(c, dtype)
    prefill = rows * prompt_tokens * (3 * c.intermediate_size + 4 * c.hidden_size) * width
    sampling = rows * 3 * c.vocab_size * 4
    return cache + max(prefill, sampling)


def batch_that_fits(config: Any, prompt_tokens: int, new_tokens: int, dtype: torch.dtype, free_bytes: int) -> int:
    """The largest batch whose `decode_bytes` stays within `MARGIN` of `free_bytes` (0 if not even one row)."""
    per_row = decode_bytes(config, 1, prompt_tokens, new_tokens, dtype)
    return int(MARGIN * free_bytes // per_row)


def free_gpu_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device now, in bytes (after the model was loaded)."""
    return int(torch.cuda.mem_get_info(device)[0])


def check_gen_batch(
    model: Any, batch_size: int, prompt_tokens: int, new_tokens: int, free_bytes: int | None = None
) -> str | None:
    """Before sampling on a GPU: raise if `batch_size` prompts cannot be decoded in the free memory (naming the value
    that fits), return a one-line hint if `HINT_FACTOR` times as many could, else None. CPUs and MPS return None (their
    memory is the machine's, and their batches are small)."""
    device = next(model.parameters()).device
    if device.type != "cuda" and free_bytes is None:
        return None
    dtype = next(model.parameters()).dtype
    free = free_gpu_bytes(device) if free_bytes is None else free_bytes
    fits = batch_that_fits(model.config, prompt_tokens, new_tokens, dtype, free)
    gb = decode_bytes(model.config, batch_size, prompt_tokens, new_tokens, dtype) / 2**30
    if batch_size > fits:
        fix = f"--set gen_batch_size={fits}" if fits else "a shorter max_new_tokens, a smaller model or load_in_4bit=true"
        raise MipoError(
            f"gen_batch_size={batch_size} needs about {gb:.1f} GB to decode {prompt_tokens}+{new_tokens} tokens a "
            f"row, and this GPU has {free / 2**30:.1f} GB free after the model: use {fix} (another batch size samples "
            f"other pairs)")
    if fits >= HINT_FACTOR * batch_size:
        return (f"this GPU could decode {fits} prompts at a time ({gb:.1f} GB for {batch_size}, "
                f"{free / 2**30:.1f} GB free): --set gen_batch_size={fits} is faster but samples other pairs")
    return None
