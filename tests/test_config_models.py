"""Presets, device/dtype choice and model loading: the tiny model, the bundled SmolLM2, 4-bit, and the errors a user
sees when something is missing (offline hub id, no bitsandbytes, bad preset) - each one line, each fast."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id must fail fast here, not retry for ~45 s

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mipo_lib import hardware, models
from mipo_lib.config import BUNDLED_MODEL, PRESETS, TINY_MODEL, Preset, get_preset, load_choices
from mipo_lib.errors import MipoError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------- presets
def test_every_preset_exists_and_is_consistent():
    assert set(PRESETS) == {"smoke", "cpu", "t4", "paper", "paper-gc", "cpu-reasoning", "smoke-reasoning"}
    for name, preset in PRESETS.items():
        assert isinstance(preset, Preset)
        assert preset.name == name
        assert get_preset(name, tuned=False) is preset
        # with committed validation choices (figures/choices_<name>.csv), get_preset applies them
        assert get_preset(name) == (preset.with_overrides(**choices) if (choices := load_choices(name)) else preset)
        assert isinstance(preset.seeds, tuple) and preset.seeds
    assert get_preset("smoke").model_id == TINY_MODEL
    assert get_preset("cpu").model_id == BUNDLED_MODEL
    assert get_preset("t4").load_in_4bit is True


def test_unknown_preset_lists_valid_names():
    with pytest.raises(MipoError) as err:
        get_preset("nope")
    msg = str(err.value)
    assert "nope" in msg
    for name in PRESETS:
        assert name in msg
    assert "\n" not in msg


def test_overrides_apply_and_unknown_field_fails():
    p = get_preset("smoke", n_train_prompts=16, beta=0.5)
    assert (p.n_train_prompts, p.beta) == (16, 0.5)
    assert PRESETS["smoke"].beta == 0.1  # the registry is untouched
    with pytest.raises(MipoError, match="n_train_prompt"):
        get_preset("smoke", n_train_prompt=3)
    with pytest.raises(MipoError, match="valid fields"):
        PRESETS["cpu"].with_overrides(not_a_field=1)


def test_seeds_override_becomes_tuple_of_ints():
    p = get_preset("smoke", seeds=[3, "4"])
    assert p.seeds == (3, 4)
    assert isinstance(p.seeds, tuple)


def test_cad_strength_defaults_to_inverse_beta():
    assert get_preset("smoke", beta=0.25).cad_strength == pytest.approx(4.0)
    assert get_preset("smoke", cad_alpha=1.5).cad_strength == 1.5


# ---------------------------------------------------------------------------------------------------- dtype/device
def test_select_dtype_cpu_auto(cpu_native_bf16):
    expected = torch.bfloat16 if cpu_native_bf16 else torch.float32
    assert hardware.select_dtype(torch.device("cpu")) is expected
    assert hardware.select_dtype(torch.device("cpu"), "auto") is expected


def test_select_dtype_auto_on_this_cpu_matches_flags():
    expected = torch.bfloat16 if hardware.cpu_has_native_bf16() else torch.float32
    assert hardware.select_dtype(torch.device("cpu"), "auto") is expected


@pytest.mark.parametrize("name,dtype", [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_select_dtype_forced(name, dtype):
    assert hardware.select_dtype(torch.device("cpu"), name) is dtype


def test_select_dtype_bad_name():
    with pytest.raises(MipoError, match="fp8"):
        hardware.select_dtype(torch.device("cpu"), "fp8")


def test_select_device_cuda_missing_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(MipoError, match="CUDA"):
        hardware.select_device("cuda")
    assert hardware.select_device().type == "cpu"


# ----------------------------------------------------------------------------------------------- tiny model/tokens
TEXTS = [
    "Hello, world!",
    "Ünïcödé — naïve café, 日本語のテキスト, emoji 🍌🎉, Ελληνικά, עברית",
    "  leading and trailing spaces  \n\ttabs and\r\nnewlines ",
    "<|im_start|> looks special but is in a sentence",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_tokenizer_round_trips_unicode(text):
    tok = models.build_tiny_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_tiny_tokenizer_has_chatml_template():
    tok = models.build_tiny_tokenizer()
    assert tok.chat_template
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.pad_token and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id != tok.eos_token_id


def test_tiny_model_loads(cpu_native_bf16):
    """Both CPU dtypes that "auto" can pick (fp32, or bf16 on AVX512-BF16/AMX CPUs) load and run the tiny model."""
    model, tok = models.load_model_and_tokenizer(TINY_MODEL)
    assert model.config.vocab_size == len(tok)
    assert tok.padding_side == "left"
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert not model.training
    assert next(model.parameters()).dtype is (torch.bfloat16 if cpu_native_bf16 else torch.float32)
    out = model(**tok(["hello"], return_tensors="pt"))
    assert out.logits.shape[-1] == len(tok)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("architecture", models.TINY_ARCHITECTURES)
def test_tiny_models_fit_every_4bit_kernel(architecture):
    """bitsandbytes' AVX512-BF16 CPU kernel repacks 4-bit weights in blocks of 64 inputs x 32 outputs."""
    model = models.build_tiny_model(architecture)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(linears) == 2 * 7
    for layer in linears:
        assert layer.in_features % 64 == 0 and layer.out_features % 32 == 0, layer
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) is (architecture == "qwen2")


def test_unknown_tiny_architecture():
    with pytest.raises(MipoError, match="gpt2.*llama, qwen2"):
        models.build_tiny_model("gpt2")


def test_tiny_model_weights_are_deterministic():
    """The tiny checkpoint is seeded: two loads (and two machines) get the same weights."""
    a, _ = models.load_model_and_tokenizer(TINY_MODEL, dtype="float32")
    b, _ = models.load_model_and_tokenizer(TINY_MODEL, dtype="float32")
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


# ------------------------------------------------------------------------------------------------------ model ids
def test_unknown_hub_model_offline_fails_fast_naming_bundled_model():
    start = time.perf_counter()
    with pytest.raises(MipoError) as err:
        models.load_model_and_tokenizer("not/a-real-model")
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "not/a-real-model" in msg and BUNDLED_MODEL in msg
    assert "\n" not in msg


@pytest.mark.parametrize("bad", ["foo", "a/b/c", "/nonexistent/folder"])
def test_malformed_model_id(bad):
    with pytest.raises(MipoError, match="unknown model"):
        models.resolve_model_path(bad)


# ------------------------------------------------------------------------------------------------------------ 4-bit
def test_tiny_model_in_4bit_is_smaller(bnb_avx512bf16):
    """On both bitsandbytes CPU paths: with AVX512-BF16 the first eval forward repacks the weights for its kernel."""
    import bitsandbytes as bnb

    fp32, _ = models.load_model_and_tokenizer(TINY_MODEL, dtype="float32")
    q4, tok = models.load_model_and_tokenizer(TINY_MODEL, dtype="float32", load_in_4bit=True)
    assert models.is_4bit(q4)
    assert not models.is_4bit(fp32)
    assert models.memory_footprint_mb(q4) < models.memory_footprint_mb(fp32)
    batch = tok(["hi there"], return_tensors="pt")
    with torch.inference_mode():
        logits = q4(**batch).logits
        again = q4(**batch).logits
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, again)
    layers = [m for m in q4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert {bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers} == {bnb_avx512bf16}


def test_4bit_without_bitsandbytes_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    start = time.perf_counter()
    with pytest.raises(MipoError) as err:
        models.load_model_and_tokenizer(TINY_MODEL, load_in_4bit=True)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "bitsandbytes" in msg and "load_in_4bit=False" in msg
    assert "\n" not in msg


# -------------------------------------------------------------------------------------------------- bundled model
@pytest.mark.slow
def test_bundled_smollm2_loads_offline_and_answers():
    from mipo_lib.generate import chat_reply

    model, tok = models.load_model_and_tokenizer(BUNDLED_MODEL)
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134.5e6) / 134.5e6 < 0.01
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.chat_template
    reply = chat_reply(model, tok, "What is the capital of France?", max_new_tokens=16)
    assert reply.strip()
    assert "Paris" in reply


# ------------------------------------------------------------------------------------------------------------- CLI
def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mipo_lib", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cli_unknown_preset_exits_2_with_one_error_line():
    start = time.perf_counter()
    proc = _cli("reproduce", "--preset", "nope", timeout=30)
    assert time.perf_counter() - start < 5
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "smoke" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_chat_smoke():
    proc = _cli("chat", "Hi", "--preset", "smoke", "--max-new-tokens", "4", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_fits_its_task_splits(name):
    """A preset's prompt counts must fit its task's splits: when issue 12 took 10 of the 40 personalization requests
    for validation, the GPU presets still asked for 400 training prompts and failed at pair generation (found by the
    GPU measurement script, which no CPU test ran)."""
    from mipo_lib.tasks import get_task

    preset = get_preset(name)
    task = get_task(preset.task)
    for seed in preset.seeds:
        assert len(task.examples("train", preset.n_train_prompts, seed=seed)) == preset.n_train_prompts
    assert len(task.examples("test", preset.n_test_prompts)) == preset.n_test_prompts
