"""Presets: one switch from a laptop CPU to the paper's GPU settings.

Every notebook and the batch runner derive all their settings from one `Preset`, so papermill, nbval and Colab use a
single mechanism: a notebook's `parameters` cell names the preset (and optional overrides), the next cell calls
`get_preset`. Settings come from ../METHOD.md (official code) adapted for LoRA/QLoRA, and from the CPU pilot.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mipo_lib.errors import MipoError

BUNDLED_MODEL = "bundled:SmolLM2-135M-Instruct"
TINY_MODEL = "tiny-random"


@dataclass(frozen=True)
class Preset:
    """All settings of one run of the workbook. Frozen: derive variants with `dataclasses.replace`."""

    name: str
    description: str
    # model
    model_id: str
    dtype: str = "auto"  # "auto" picks bf16/fp16/fp32 from the device (see models.select_dtype)
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    # task and data sizes
    task: str = "personalization"
    n_train_prompts: int = 120  # training prompts (request x preference for personalization)
    n_test_prompts: int = 200  # held-out evaluation prompts
    # pair generation (METHOD.md: temperature 0.1, top_p 0.9 officially; the pilot found T=0.8 works for diversity)
    negative: str = "context_drop"  # context_drop | random_context | random_prompt
    k_negatives: int = 1
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 48
    gen_batch_size: int = 32
    score_batch_size: int = 16
    # LoRA / DPO (official: full fine-tuning, beta 0.1, lr 5e-7; LoRA needs a much larger lr)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    beta: float = 0.1
    learning_rate: float = 2e-4
    sft_learning_rate: float = 2e-4
    epochs: int = 2
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    warmup_ratio: float = 0.03
    # evaluation
    eval_max_new_tokens: int = 48
    eval_batch_size: int = 50
    cad_alpha: float | None = None  # context-aware decoding strength; None means 1/beta (MIPO's decode-time twin)
    seeds: tuple[int, ...] = (0, 1, 2)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cad_strength(self) -> float:
        return self.cad_alpha if self.cad_alpha is not None else 1.0 / self.beta

    def with_overrides(self, **overrides: Any) -> "Preset":
        """Return a copy with some fields changed; unknown field names fail with the list of valid ones."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise MipoError(f"unknown preset field(s) {unknown}; valid fields: {sorted(valid)}")
        if "seeds" in overrides:
            overrides["seeds"] = tuple(int(s) for s in overrides["seeds"])
        return dataclasses.replace(self, **overrides)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="tiny random model built in code; proves the plumbing in seconds, not the science",
        model_id=TINY_MODEL,
        dtype="float32",
        n_train_prompts=16,
        n_test_prompts=20,
        max_new_tokens=8,
        gen_batch_size=16,
        score_batch_size=16,
        epochs=1,
        batch_size=4,
        max_length=256,  # the tiny tokenizer is byte-level: chat prompts are up to 161 tokens
        eval_max_new_tokens=8,
        eval_batch_size=20,
        seeds=(0, 1, 2),
    ),
    "cpu": Preset(
        name="cpu",
        description="SmolLM2-135M-Instruct bundled offline, on CPU, verifiable personalization, 3 seeds",
        model_id=BUNDLED_MODEL,
        dtype="auto",
        # Sized to finish 3 seeds of everything on 2 slow cores: 60 pairs (6 requests x 10 preferences), 32-token
        # replies, 100 held-out prompts (10 unseen requests x 10 preferences), 2 epochs at batch 4 (30 DPO steps).
        n_train_prompts=60,
        n_test_prompts=100,
        max_new_tokens=32,
        gen_batch_size=64,
        score_batch_size=32,
        batch_size=4,
        max_length=192,
        eval_max_new_tokens=32,
        eval_batch_size=100,
    ),
    "t4": Preset(
        name="t4",
        description="free Colab T4 (16 GB, no bf16): Qwen2.5-1.5B-Instruct in 4-bit NF4 QLoRA, fp16 compute",
        model_id="Qwen/Qwen2.5-1.5B-Instruct",
        load_in_4bit=True,
        gradient_checkpointing=True,
        n_train_prompts=400,  # all 40 training requests x 10 preferences
        n_test_prompts=200,  # all 20 held-out requests x 10 preferences
        temperature=0.8,
        max_new_tokens=256,
        gen_batch_size=32,
        score_batch_size=8,
        lora_r=16,
        lora_alpha=32,
        lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        learning_rate=5e-5,
        sft_learning_rate=5e-5,
        epochs=1,
        batch_size=2,
        grad_accum=2,
        max_length=1024,
        eval_max_new_tokens=256,
        eval_batch_size=32,
    ),
    "paper": Preset(
        name="paper",
        description="24-80 GB GPU: Llama-3.2-1B-Instruct as in the paper, bf16 LoRA, official sampling settings",
        model_id="meta-llama/Llama-3.2-1B-Instruct",
        n_train_prompts=400,  # personalization has 400 training prompts; the GSM8K/ARC loaders have more
        n_test_prompts=200,
        temperature=0.1,
        top_p=0.9,
        max_new_tokens=512,
        gen_batch_size=64,
        score_batch_size=16,
        lora_r=64,
        lora_alpha=128,
        lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        learning_rate=2e-5,
        sft_learning_rate=2e-5,
        epochs=1,
        batch_size=4,
        grad_accum=1,
        max_length=1536,
        eval_max_new_tokens=512,
        eval_batch_size=64,
    ),
}


def get_preset(name: str, **overrides: Any) -> Preset:
    """Look a preset up by name and apply overrides. Unknown names fail with the list of valid ones."""
    try:
        preset = PRESETS[name]
    except KeyError:
        raise MipoError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
    return preset.with_overrides(**overrides) if overrides else preset


def runs_dir() -> Path:
    """Root of everything generated (pairs, adapters, metrics, executed notebooks); ignored by git.

    `MIPO_RUNS_DIR` moves it (tests use a temporary folder); otherwise `runs/` at the repository root.
    """
    env = os.environ.get("MIPO_RUNS_DIR")
    return Path(env) if env else repo_root() / "runs"


def repo_root() -> Path:
    """The workbook's top folder (holds notebooks/, data/, figures/)."""
    return Path(__file__).resolve().parent.parent


def run_dir(preset: Preset | str, *parts: str | int) -> Path:
    """`runs/<preset>/<parts...>`, created on demand."""
    name = preset if isinstance(preset, str) else preset.name
    path = runs_dir().joinpath(name, *map(str, parts))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """Where converted model checkpoints live (outside the repo so clones share them)."""
    env = os.environ.get("MIPO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mipo"
