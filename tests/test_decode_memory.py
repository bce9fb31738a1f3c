"""Batched decoding's memory from the model config (`mipo_lib.decode_memory`), checked against the cache transformers
really builds, and the GPU check before pairs are sampled with faked free memory (CI has no GPU)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from mipo_lib import decode_memory, pairs
from mipo_lib.config import get_preset
from mipo_lib.errors import MipoError
from mipo_lib.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")

#: Qwen2.5-1.5B-Instruct, the t4 preset's model (its config.json).
QWEN_1_5B = SimpleNamespace(num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, hidden_size=1536,
                            head_dim=128, intermediate_size=8960, vocab_size=151936)
GB = 2**30


@pytest.fixture(scope="module")
def preset():
    return get_preset("smoke")


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_kv_bytes_per_token_is_what_the_model_caches(tiny):
    model, _ = tiny
    rows, tokens = 3, 7
    with torch.inference_mode():
        out = model(input_ids=torch.ones(rows, tokens, dtype=torch.long), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert _cache_bytes(cache) == rows * tokens * decode_memory.kv_bytes_per_token(model.config, torch.float32)


def test_the_t4_batch_matches_the_issue_arithmetic():
    # 32 prompts x 1,280 tokens of Qwen2.5-1.5B's fp16 cache: about 1.2 GB of a T4's 15
    per_token = decode_memory.kv_bytes_per_token(QWEN_1_5B, torch.float16)
    assert per_token == 2 * 28 * 2 * 128 * 2
    assert 1.0 * GB < 32 * 1280 * per_token < 1.2 * GB
    need = decode_memory.decode_bytes(QWEN_1_5B, 32, 1024, 256, torch.float16)
    assert need > 32 * 1280 * per_token  # plus the prefill's transient


def test_a_batch_that_cannot_fit_stops_with_the_value_that_does(tiny):
    model, _ = tiny
    per_row = decode_memory.decode_bytes(model.config, 1, 100, 50, torch.float32)
    with pytest.raises(MipoError, match=r"--set gen_batch_size=8 ") as err:
        decode_memory.check_gen_batch(model, 16, 100, 50, free_bytes=int(10 * per_row))  # 80% of 10 rows: 8
    assert "samples other pairs" in str(err.value)
    with pytest.raises(MipoError, match="shorter max_new_tokens"):
        decode_memory.check_gen_batch(model, 16, 100, 50, free_bytes=per_row // 2)


def test_room_for_four_times_the_batch_gets_a_hint_and_a_fitting_batch_nothing(tiny):
    model, _ = tiny
    per_row = decode_memory.decode_bytes(model.config, 1, 100, 50, torch.float32)
    hint = decode_memory.check_gen_batch(model, 16, 100, 50, free_bytes=int(100 * per_row))
    assert hint is not None and "--set gen_batch_size=80" in hint and "other pairs" in hint
    assert decode_memory.check_gen_batch(model, 16, 100, 50, free_bytes=int(30 * per_row)) is None


def test_a_cpu_model_is_not_checked(tiny):
    model, _ = tiny
    assert decode_memory.check_gen_batch(model, 10**6, 1000, 1000) is None


def test_pairs_stop_before_sampling_when_the_batch_cannot_fit(tiny, preset, monkeypatch, tmp_path):
    monkeypatch.setenv("MIPO_RUNS_DIR", str(tmp_path))
    model, tok = tiny
    monkeypatch.setattr(pairs, "check_gen_batch", functools.partial(decode_memory.check_gen_batch, free_bytes=1))
    monkeypatch.setattr(pairs, "generate_reply_batches", lambda *a, **k: pytest.fail("sampled before the check"))
    with pytest.raises(MipoError, match="gen_batch_size"):
        pairs.build_pairs(model, tok, get_task(preset.task), preset, 0, progress=False)
