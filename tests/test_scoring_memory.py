"""Scoring keeps memory bounded with a large vocabulary (issue: fp32 full-vocabulary copies overflow a T4).

Each measurement runs in a fresh Python process so its peak resident memory (`ru_maxrss`) belongs to one scoring
call: a tiny Llama with Qwen2.5's 151,936-token vocabulary scores a batch of 8 x 256 tokens in fp32, where one batch
of logits is 1.2 GB. The library's `completion_logprobs` must stay within 1.5x of that; the naive full log-softmax
(the code it replaced, kept here as the reference) needs well over 2x, which shows the test can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

QWEN_VOCAB = 151_936
BATCH, PROMPT, COMPLETION = 8, 64, 192

SCRIPT = r"""
import json, resource, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from mipo_lib.scoring import completion_logprobs

torch.set_num_threads(1)
vocab, batch, n_prompt, n_comp, which = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).eval()
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(0, vocab, (n_prompt - (i % 3),), generator=g).tolist() for i in range(batch)]
comps = [torch.randint(0, vocab, (n_comp - 5 * (i % 4),), generator=g).tolist() for i in range(batch)]

def naive(model, prompts, comps, pad_id):
    width = max(len(p) + len(c) for p, c in zip(prompts, comps))
    ids = torch.full((len(prompts), width), pad_id); mask = torch.zeros_like(ids); target = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c); mask[i, : len(p) + len(c)] = 1; target[i, len(p) : len(p) + len(c)] = True
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return (lp * target[:, 1:]).sum(1).double().numpy()

with torch.inference_mode():  # warm-up on one short row, so lazy one-off allocations are not counted
    completion_logprobs(model, prompts[:1], [comps[0][:4]], 0, batch_size=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
values = naive(model, prompts, comps, 0) if which == "naive" else completion_logprobs(model, prompts, comps, 0, batch_size=batch)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mb": (after - before) / 1024, "values": [float(v) for v in values]}))
"""


def _measure(which: str, vocab: int = QWEN_VOCAB, batch: int = BATCH) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(vocab), str(batch), str(PROMPT), str(COMPLETION), which],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_scoring_peak_memory_is_bounded_with_qwen_vocabulary_and_values_match_full_log_softmax():
    one_batch_of_logits_mb = BATCH * (PROMPT + COMPLETION) * QWEN_VOCAB * 4 / 2**20  # fp32 model on the CPU
    bounded = _measure("library")
    naive = _measure("naive")
    assert bounded["growth_mb"] <= 1.5 * one_batch_of_logits_mb, (bounded["growth_mb"], one_batch_of_logits_mb)
    assert naive["growth_mb"] > 1.5 * one_batch_of_logits_mb, "the reference should exceed the bound (test must be able to fail)"
    for a, b in zip(bounded["values"], naive["values"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (a, b)
