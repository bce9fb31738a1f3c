"""Presets: one switch from a laptop CPU to the paper's GPU settings, and where each value of a run comes from.

Every notebook and the batch runner derive all their settings from one `Preset`, so papermill, nbval and Colab use a
single mechanism: a notebook's `parameters` cell names the preset (`PRESET`) and optional field overrides
(`OVERRIDES`, a dict), the next cell calls `get_preset(PRESET, **OVERRIDES)`; the command line fills both
(`python -m mipo_lib reproduce --preset cpu --set beta=0.3`). Settings come from the paper's official code, adapted
for LoRA/QLoRA, and from the CPU pilot.

Each field is documented once, in its `help` metadata; `python -m mipo_lib reproduce --help` lists every field with its
type and default (`fields_help`). Presets are data: each built-in one lists only what differs from its parent (the
dataclass defaults, or another preset through `dataclasses.replace`).

A run's values come in layers (`resolve_preset`, which `get_preset` uses), each later layer winning for the fields it
sets:
1. the preset as written (`PRESETS`);
2. with `task_defaults` (t4, paper), the task's official settings (`tasks.task_settings`);
3. the settings `make tune` chose on the validation split for this preset (`figures/choices_<preset>.csv`; skipped with
   `tuned=False`);
4. the caller's overrides (`--set` on the command line, `OVERRIDES` in a notebook): they always win.
`Resolved.sources` names each field's layer; `Resolved.changes` lists, one line per value, what differs from the preset
as written (the runner prints it before the first notebook).

Stale choices: a choices table records, per row, the settings its tuning read (`tuned_under`: model, dtype, task,
sampling, LoRA and DPO settings, evaluation settings; everything but the choices themselves). When a run's settings
differ from them, the choices are still applied (a value chosen on validation under nearby settings is a better guess
than the preset's untuned one), and one line per process says which fields differ, which choices are affected and how
to choose anew. `dtype` is compared as resolved on this machine ("auto" means bf16 on some CPUs and fp32 on others).

Values are checked where they enter: every `Preset` (built in, overridden or built by hand) is coerced to its fields'
types and validated in `__post_init__`, so `beta=-1` or `seeds=()` fails at once with one line naming the fix instead
of minutes later inside TRL. Overrides given as text (the command line, papermill) are parsed by the field's type.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import numbers
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from mipo_lib.errors import MipoError

BUNDLED_MODEL = "bundled:SmolLM2-135M-Instruct"
TINY_MODEL = "tiny-random"
#: Compute dtypes `hardware.select_dtype` understands ("auto" picks one from the device).
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
#: Kinds of negative `pairs.build_pairs` makes (pairs.py explains each one).
NEGATIVES: tuple[str, ...] = ("context_drop", "random_context", "random_prompt")
#: Fields that count things or set step sizes: zero or less is always a mistake.
POSITIVE_FIELDS: tuple[str, ...] = (
    "n_train_prompts", "n_test_prompts", "k_negatives", "max_new_tokens", "gen_batch_size", "score_batch_size",
    "lora_r", "lora_alpha", "beta", "learning_rate", "sft_learning_rate", "epochs", "batch_size", "grad_accum",
    "max_length", "eval_max_new_tokens", "eval_batch_size", "sft_epochs",
)
#: The source `resolve_preset` gives the caller's overrides.
OVERRIDE_SOURCE = "--set"


@dataclass(frozen=True)
class Preset:
    """All settings of one run of the workbook. Frozen: derive variants with `dataclasses.replace`.

    Each field's `help` (below, and in `python -m mipo_lib reproduce --help`) says what it changes and which preset
    uses what.
    """

    name: str = field(metadata={"help": (
        "Names the run's folder, runs/<name>/ (pairs, adapters, evaluations, executed notebooks). Change it to keep a "
        "variant's results apart from the preset's own, e.g. --set name=cpu-beta03; the validation choices are still "
        "the ones of the preset asked for (figures/choices_<preset>.csv).")})
    description: str = field(metadata={"help": (
        "One line saying what the preset is for, printed at the top of every notebook; no result depends on it.")})
    model_id: str = field(metadata={"help": (
        "The base model: a Hugging Face hub id (t4: Qwen/Qwen2.5-1.5B-Instruct, paper: "
        "meta-llama/Llama-3.2-1B-Instruct), a local checkpoint folder, bundled:SmolLM2-135M-Instruct (cpu: the 135M "
        "model that ships with the repository, works offline) or tiny-random (smoke: a tiny random Llama built in "
        "code, for plumbing tests only).")})
    dtype: str = field(default="auto", metadata={"help": (
        "Compute precision: auto picks bf16 on GPUs that support it, fp16 on older GPUs (a T4), bf16 on CPUs with "
        "native bf16 instructions (AVX512-BF16/AMX) and fp32 on other CPUs (emulated bf16 is about 5x slower); "
        "float32, float16 or bfloat16 force one. The committed cpu results were computed in float32: --set "
        "dtype=float32 reproduces them on a CPU with native bf16.")})
    load_in_4bit: bool = field(default=False, metadata={"help": (
        "Load the base model's weights in 4-bit NF4 and train LoRA on top (QLoRA; needs bitsandbytes): about a "
        "quarter of the weights' memory, slower steps. t4 uses it to fit a 1.5B model in 16 GB.")})
    gradient_checkpointing: bool = field(default=False, metadata={"help": (
        "Recompute activations in the backward pass instead of storing them: much less training memory, slower "
        "steps (t4 uses it). On a CPU it also turns off running each DPO prompt once per step.")})
    task: str = field(default="personalization", metadata={"help": (
        "What the model learns and is judged on: personalization (cpu, t4, paper: a request under a user's stated "
        "preference, checked by a program), personalization_unseen_types (trained on five preference types, tested "
        "on the other five), an arithmetic level such as arithmetic_word (cpu-reasoning) or "
        "arithmetic_one_digit_add (smoke-reasoning), or an official dataset: gsm8k, svamp, arc_easy, arc_challenge, "
        "prism (downloaded; for the GPU presets). A task registered with register_task or a MIPO_PLUGINS module "
        "works too.")})
    n_train_prompts: int = field(default=120, metadata={"help": (
        "Training prompts per seed, each giving k_negatives pairs. personalization has 300 (30 requests x 10 "
        "preferences; 10 further requests are the validation split): cpu 60 (6 requests x 10 preferences), t4 and "
        "paper all 300; the GSM8K, SVAMP and ARC loaders have more.")})
    n_test_prompts: int = field(default=200, metadata={"help": (
        "Held-out prompts each method is evaluated on: cpu 100 (10 unseen requests x 10 preferences), t4 and paper "
        "200 (all 20 held-out requests x 10 preferences), cpu-reasoning 200 problems; with task_defaults the task's "
        "official count (gsm8k 200, svamp 300, arc 500, prism 200).")})
    negative: str = field(default="context_drop", metadata={"help": (
        "How each pair's rejected reply is made: context_drop samples it for the same request without the user's "
        "context (the official PRISM code; cpu, t4, paper); random_context takes the same request's reply under "
        "another user's context (where the conditional MI derivation is exact); random_prompt takes the reply to "
        "another training prompt (unconditional MIPO, for math and multiple choice; cpu-reasoning, "
        "smoke-reasoning).")})
    k_negatives: int = field(default=1, metadata={"help": (
        "Rejected replies per prompt: k > 1 makes k pairs per prompt with k different negatives (notebook 06 tries "
        "it); 1 in every preset.")})
    temperature: float = field(default=0.8, metadata={"help": (
        "Sampling temperature of the pairs' replies (0 is greedy). The CPU pilot found 0.8 gives personalization "
        "pairs the diversity they need (cpu, t4); the official code samples at 0.1 (paper, cpu-reasoning; math and "
        "PRISM official settings) and ARC at 1.0.")})
    top_p: float = field(default=0.95, metadata={"help": (
        "Nucleus sampling of the pairs' replies, in (0, 1]: 0.95 by default, 0.9 as in the official code (paper, "
        "cpu-reasoning, every task's official settings).")})
    max_new_tokens: int = field(default=48, metadata={"help": (
        "Token cap of the pairs' sampled replies; a reply cut there is flagged in the pairs (chosen_truncated, "
        "rejected_truncated) and DPO learns from the cut text. cpu 64 (a cost choice: sampling and training "
        "dominate its run), cpu-reasoning 128 (few of its pairs' replies reach it: notebook 07 counts them; its "
        "evaluation cap is chosen under a bound of 256), t4 256, paper and the official settings 512.")})
    gen_batch_size: int = field(default=32, metadata={"help": (
        "Prompts sampled together when making pairs (and in notebook 06's KL estimate): larger is faster until "
        "memory runs out (on a GPU the pairs stage checks it against the free memory first and names a value that "
        "fits, `decode_memory`). The batch plan seeds the sampling, so another value samples other pairs.")})
    score_batch_size: int = field(default=16, metadata={"help": (
        "Pairs scored together under the base model (reference log-probs, PMI): a memory knob. Another value "
        "rescores the stored replies without sampling them again.")})
    lora_r: int = field(default=8, metadata={"help": (
        "LoRA rank, the adapter's capacity: cpu 8, t4 16, paper 64 (the official code fine-tunes all weights "
        "instead).")})
    lora_alpha: int = field(default=16, metadata={"help": (
        "LoRA scaling: the update is multiplied by lora_alpha / lora_r; twice the rank in every preset (cpu 16, t4 "
        "32, paper 128).")})
    lora_dropout: float = field(default=0.0, metadata={"help": (
        "Dropout on the LoRA layers' input during training, in [0, 1); 0 in every preset.")})
    lora_target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"), metadata={"help": (
        "The modules that get LoRA adapters, comma-separated: the attention projections by default (cpu); t4 and "
        "paper add the MLP's gate_proj,up_proj,down_proj.")})
    beta: float = field(default=0.1, metadata={"help": (
        "DPO's beta: how closely the trained model is held to the base model (larger: closer). 0.1 as in the "
        "official code; notebook 06 varies it. Also sets context-aware decoding's default strength, 1/beta.")})
    learning_rate: float = field(default=2e-4, metadata={"help": (
        "MIPO's (DPO's) learning rate, constant after warm-up. The official code fine-tunes all weights at 5e-7; "
        "LoRA needs far more (5e-5 moved nothing visible on cpu in the pilot): cpu 2e-4 as written, 8e-4 as "
        "chosen by make tune's one-standard-error rule on validation (figures/choices_cpu.csv); t4 5e-5 and paper 2e-5 are NOT validated on their models "
        "(nobody has run make tune PRESET=t4 on a GPU yet; expect them too small for LoRA, as 5e-5 was on cpu).")})
    sft_learning_rate: float = field(default=2e-4, metadata={"help": (
        "The SFT baseline's learning rate, chosen apart from MIPO's so each method runs at its own best: cpu 2e-4 "
        "as written, 8e-4 as chosen on validation (figures/choices_cpu.csv); t4 5e-5 and paper 2e-5, not validated "
        "on their models (make tune PRESET=t4 chooses both on a GPU).")})
    epochs: int = field(default=2, metadata={"help": (
        "MIPO's (DPO's) passes over the pairs: cpu 2 as written, and 2 as chosen by make tune on validation "
        "(8 epochs scored best, 2 at 8e-4 within one standard error of it; figures/choices_cpu.csv); cpu-reasoning "
        "as chosen on its validation problems (figures/choices_cpu-reasoning.csv); t4 and paper 1, as the official code trains, not validated on their "
        "models with LoRA (make tune PRESET=t4 chooses epochs on a GPU).")})
    sft_epochs: int = field(default=2, metadata={"help": (
        "The SFT baseline's own passes over the chosen replies (make tune chooses them apart from MIPO's): cpu 2 as "
        "written, 4 as chosen on validation; t4 and paper 1, not validated on their models.")})
    batch_size: int = field(default=8, metadata={"help": (
        "Pairs per training step (times grad_accum per optimizer update): cpu 4, t4 2, paper 4. Lower it when "
        "training runs out of memory.")})
    grad_accum: int = field(default=1, metadata={"help": (
        "Training steps accumulated per optimizer update: a larger effective batch without more memory (t4: 2 x 2 "
        "= 4 pairs per update).")})
    max_length: int = field(default=256, metadata={"help": (
        "Token budget of prompt + reply when scoring and training; longer replies are cut to fit, and a prompt "
        "that fills it stops training with an error, so it must exceed the longest prompt. cpu 192, smoke 256 (its "
        "byte-level tokenizer makes chat prompts up to 161 tokens), t4 1024, paper 1536.")})
    warmup_ratio: float = field(default=0.03, metadata={"help": (
        "Share of one epoch's optimizer steps spent warming the learning rate up, rounded up to whole steps (0: "
        "none). The rate is constant afterwards, which lets make tune read shorter runs off one long run's "
        "snapshots.")})
    eval_max_new_tokens: int = field(default=48, metadata={"help": (
        "Token cap of the evaluated (greedy) replies; a reply that reaches it is cut and counted as truncated. cpu "
        "192, sized so that replies finish (every request asks for 2-3 sentences): on the 40 train and validation "
        "requests every greedy reply ends by 151 tokens but one context-free reply, which still runs at 1,024 "
        "(measured 2026-11-28; at 128 tokens, before the instruction, 40% of prompting and all context-free replies "
        "were cut). cpu-reasoning: the smallest cap at which at least 95% of every method's validation replies finish, "
        "or the 256-token bound where none does (figures/reasoning_cap_cpu.csv); t4 256, paper 512.")})
    eval_batch_size: int = field(default=50, metadata={"help": (
        "Prompts decoded together in evaluation (and by the LLM judge): a speed and memory knob (cpu 100, t4 32, "
        "paper 64). Padding changes the numerics slightly, so evaluations are cached per value.")})
    eval_batch_new_tokens: int = field(default=0, metadata={"help": (
        "> 0: a batch decodes its replies together for this many new tokens, then only the unfinished ones go on, "
        "alone, up to eval_max_new_tokens, so a long cap costs only the replies that use it; 0 decodes each batch "
        "in one go. cpu 96 (100 validation prompts in 60 s instead of 101 s, every reply identical; 64 and 128: 67 "
        "s and 65 s), smoke 4 (so the tests run the two-stage decode).")})
    eval_no_repeat_ngram: int = field(default=0, metadata={"help": (
        "> 0: greedy evaluation may not repeat an n-gram of this length within a reply (a small model loops until "
        "the token cap otherwise): cpu 3; 0 (off) elsewhere.")})
    cad_alpha: float | None = field(default=None, metadata={"help": (
        "Strength a of context-aware decoding (the CAD baseline), which scores next tokens by (1+a) log p(y|x,c) - "
        "a log p(y|x); none means 1/beta, MIPO's decode-time twin. cpu: 1, chosen on validation "
        "(figures/choices_cpu.csv).")})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": (
        "Seeds to run, comma-separated: each seed samples its own pairs and trains its own adapters, and results "
        "report intervals over seeds. cpu 5 (an interval over seeds needs more than three: docs/statistics.md); 3 "
        "elsewhere; --seeds on the command line runs a subset.")})
    report_to: str = field(default="none", metadata={"help": (
        "Where training logs go (transformers' report_to): none, or loggers such as tensorboard (pip install "
        "tensorboard) or tensorboard,wandb; TensorBoard writes under the adapter's folder (tensorboard --logdir "
        "runs/<preset>).")})
    task_defaults: bool = field(default=False, metadata={"help": (
        "true: every field the caller does not set comes from the task's official settings (the official code's "
        "sampling, token caps, test size and negative for that dataset), so --set task=gsm8k samples at "
        "temperature 0.1, top_p 0.9; t4 and paper use it.")})

    def __post_init__(self) -> None:
        """Coerce each value to its field's type (text is parsed, lists become tuples), then `validate`."""
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, conform(f.name, getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Refuse values that cannot work, with one line naming the field and a value that would."""
        for name in POSITIVE_FIELDS:
            self._require(getattr(self, name) > 0, name, "must be greater than 0")
        self._require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self._require(self.temperature >= 0, "temperature", "must be >= 0 (0 is greedy)")
        self._require(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        self._require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        self._require(self.eval_no_repeat_ngram >= 0, "eval_no_repeat_ngram", "must be >= 0 (0 is off)")
        self._require(self.eval_batch_new_tokens >= 0, "eval_batch_new_tokens", "must be >= 0 (0 is off)")
        self._require(self.cad_alpha is None or self.cad_alpha >= 0, "cad_alpha", "must be >= 0, or none for 1/beta")
        self._require(bool(self.name.strip()) and "/" not in self.name, "name", "must be a non-empty folder name")
        self._require(bool(self.model_id.strip()), "model_id", "must name a model")
        self._require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        self._require(self.negative in NEGATIVES, "negative", f"is an unknown negative; choose one of {', '.join(NEGATIVES)}")
        self._require(all(m.strip() for m in self.lora_target_modules) and bool(self.lora_target_modules),
                      "lora_target_modules", "must name at least one module")
        self._require(bool(self.seeds), "seeds", "must hold at least one seed")
        self._require(len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0, "seeds",
                      "must be distinct integers >= 0")
        self._require(bool(self.report_to.strip()), "report_to", "must be 'none' or a logger such as tensorboard")
        from mipo_lib import tasks  # imported here, not at the top, so that a task module may import config

        if self.task not in tasks.task_names():
            tasks.load_plugins()  # a task registered by a MIPO_PLUGINS module
        self._require(self.task in tasks.task_names(), "task",
                      f"is an unknown task; choose one of {', '.join(tasks.task_names())} (or register_task it)")

    def _require(self, ok: bool, name: str, rule: str) -> None:
        """Raise the one-line error for field `name` unless `ok` (NaN fails every comparison, so it lands here)."""
        if not ok:
            raise MipoError(f"preset {self.name!r}: {name}={getattr(self, name)!r} {rule}{_example(name)}")

    @property
    def cad_strength(self) -> float:
        return self.cad_alpha if self.cad_alpha is not None else 1.0 / self.beta

    def with_overrides(self, **overrides: Any) -> "Preset":
        """Return a validated copy with some fields changed; unknown field names fail naming the valid ones."""
        for name in overrides:
            field_type(name)
        return dataclasses.replace(self, **overrides)


_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(Preset)
_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(Preset) if f.default is not dataclasses.MISSING and f.default is not None
}


def field_type(name: str) -> Any:
    """The declared type of preset field `name`; an unknown name fails with the closest match and every valid one."""
    try:
        return _FIELD_TYPES[name]
    except KeyError:
        close = difflib.get_close_matches(name, _FIELD_TYPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MipoError(f"unknown preset field {name!r}{hint}; valid fields: {', '.join(_FIELD_TYPES)}") from None


def _describe(hint: Any) -> str:
    """How a type reads in an error message or the help ("an integer", "comma-separated text", ...)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or none"
    if typing.get_origin(hint) is tuple:
        return f"comma-separated {'integers' if args[0] is int else 'text'}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}[hint]


def cli_text(value: Any) -> str:
    """A value as `--set field=<text>` spells it (tuples comma-separated, None as none, booleans lower-case)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def conform(name: str, value: Any) -> Any:
    """`value` as field `name`'s type. Text (the command line, papermill, a choices table) is parsed: `0.3`, `true`,
    `none`, `q_proj,v_proj`; sequences (lists, arrays) become tuples; ints become floats where a float is declared.
    Anything else fails in one line with an example of a value that works."""
    hint = field_type(name)
    try:
        return _conform(value, hint)
    except (TypeError, ValueError):
        raise MipoError(f"preset field {name} takes {_describe(hint)}, got {value!r}{_example(name)}") from None


def _conform(value: Any, hint: Any) -> Any:
    """`value` as type `hint`, or TypeError/ValueError."""
    text = value.strip() if isinstance(value, str) else None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # an optional field: `float | None`
        if value is None or (text is not None and text.lower() in ("none", "null", "")):
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        items = [t.strip() for t in text.split(",") if t.strip()] if text is not None else value
        if isinstance(items, (bytes, dict)) or not isinstance(items, Iterable):
            raise TypeError(value)
        return tuple(_conform(item, typing.get_args(hint)[0]) for item in items)
    if hint is str and isinstance(value, str):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is bool and text is not None and text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    if hint in (int, float) and text is not None:
        return hint(text)
    if hint is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if hint is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(value)


def _example(name: str) -> str:
    """"; e.g. beta=0.1": the field's default as the fix an error message suggests (nothing for fields without one)."""
    default = _DEFAULTS.get(name)
    return f"; e.g. {name}={cli_text(default)}" if default is not None else ""


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """`["beta=0.3", "seeds=0,1"]` (the command line's repeatable `--set`) as overrides `{"beta": 0.3, "seeds": (0, 1)}`."""
    overrides: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise MipoError(f"--set expects field=value (e.g. --set beta=0.3), got {item!r}")
        overrides[name.strip()] = conform(name.strip(), text)
    return overrides


def fields_help(width: int = 100) -> str:
    """Every preset field with its type, its default and its help, as the command line's `--help` lists them."""
    lines = ["preset fields (--set FIELD=VALUE, repeatable; a preset's own value replaces the default):"]
    for f in dataclasses.fields(Preset):
        default = f"default {cli_text(f.default)}" if f.default is not dataclasses.MISSING else "every preset sets it"
        lines.append(f"  {f.name} ({_describe(_FIELD_TYPES[f.name])}; {default})")
        lines += textwrap.wrap(f.metadata["help"], width, initial_indent=" " * 6, subsequent_indent=" " * 6,
                               break_on_hyphens=False)
    return "\n".join(lines)


# Each preset lists only what differs from its parent: the dataclass defaults, or the preset it is replaced from.
_SMOKE = Preset(
    name="smoke",
    description="tiny random model built in code; proves the plumbing in seconds, not the science",
    model_id=TINY_MODEL,
    dtype="float32",
    n_train_prompts=16,
    n_test_prompts=20,
    max_new_tokens=8,
    gen_batch_size=16,
    epochs=1,
    sft_epochs=1,
    batch_size=4,
    eval_max_new_tokens=8,
    eval_batch_new_tokens=4,
    eval_batch_size=20,
)
# Sized to finish 5 seeds of notebooks 00-05 within an hour on 2 slow cores (60 pairs, 100 held-out prompts, batch 4),
# with token caps that let replies finish; epochs, learning rates and CAD's strength are chosen on validation
# (`make tune`). Five seeds, not three: a seed-aware interval has n - 1 degrees of freedom over seeds.
_CPU = Preset(
    name="cpu",
    description="SmolLM2-135M-Instruct bundled offline, on CPU, verifiable personalization, 5 seeds",
    model_id=BUNDLED_MODEL,
    seeds=(0, 1, 2, 3, 4),
    n_train_prompts=60,
    n_test_prompts=100,
    max_new_tokens=64,
    gen_batch_size=64,
    score_batch_size=32,
    batch_size=4,
    max_length=192,
    eval_max_new_tokens=192,
    eval_batch_new_tokens=96,
    eval_batch_size=100,
    eval_no_repeat_ngram=3,
)
_PAPER = Preset(
    name="paper",
    task_defaults=True,
    description="40-80 GB GPU: Llama-3.2-1B-Instruct as in the paper, bf16 LoRA, official sampling settings; LoRA "
                "learning rate and epochs not validated on this model (make tune PRESET=paper)",
    model_id="meta-llama/Llama-3.2-1B-Instruct",
    n_train_prompts=300,
    temperature=0.1,
    top_p=0.9,
    max_new_tokens=512,
    gen_batch_size=64,
    lora_r=64,
    lora_alpha=128,
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    learning_rate=2e-5,
    sft_learning_rate=2e-5,
    epochs=1,
    sft_epochs=1,
    batch_size=4,
    max_length=1536,
    eval_max_new_tokens=512,
    eval_batch_size=64,
)
PRESETS: dict[str, Preset] = {
    "smoke": _SMOKE,
    "cpu": _CPU,
    # the paper's GPU setting scaled down to a free Colab T4: a 1.5B model in 4-bit, a smaller adapter, shorter caps,
    # the pilot's sampling for personalization
    "t4": dataclasses.replace(
        _PAPER,
        name="t4",
        description="free Colab T4 (16 GB, no bf16): Qwen2.5-1.5B-Instruct in 4-bit NF4 QLoRA, fp16 compute; LoRA "
                    "learning rate and epochs not validated on this model (make tune PRESET=t4)",
        model_id="Qwen/Qwen2.5-1.5B-Instruct",
        load_in_4bit=True,
        gradient_checkpointing=True,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=256,
        gen_batch_size=32,
        score_batch_size=8,
        lora_r=16,
        lora_alpha=32,
        learning_rate=5e-5,
        sft_learning_rate=5e-5,
        batch_size=2,
        grad_accum=2,
        max_length=1024,
        eval_max_new_tokens=256,
        eval_batch_size=32,
    ),
    "paper": _PAPER,
    # The paper preset for a 24 GB card (RTX 3090/4090 report about 23.6 GiB): its DPO step peaks at 26.0 GB without
    # gradient checkpointing and 6.1 GB with it (data/gpu_memory_peaks.csv); `environment.recommend_preset` picks it.
    "paper-gc": dataclasses.replace(
        _PAPER,
        name="paper-gc",
        description="24 GB GPU: the paper preset with gradient checkpointing (about 1.4x slower DPO steps, a quarter of their memory)",
        gradient_checkpointing=True,
    ),
    "smoke-reasoning": dataclasses.replace(
        _SMOKE,
        name="smoke-reasoning",
        description="tiny random model on one-digit addition: notebook 07's plumbing in seconds, not the science",
        task="arithmetic_one_digit_add",
        negative="random_prompt",
        n_train_prompts=8,
        n_test_prompts=10,
        eval_batch_new_tokens=0,
    ),
    # Notebook 07 (reasoning, `make reasoning`): unconditional MIPO, the negative is the answer to another problem. The
    # cpu preset's model, precision, batch sizes and LoRA; every other choice was made on validation problems
    # (`make reasoning-choices SET="dtype=float32"`, in this order): the task is the level whose base accuracy is the
    # lowest inside 20-70% with the prompt's `Answer: <number>` format (figures/reasoning_difficulty_cpu.csv, at the
    # cap's upper bound); MIPO's and SFT's epochs and learning rates come from figures/choices_cpu-reasoning.csv (seed 0,
    # the one-standard-error rule, at the bound); the evaluation cap is the smallest at which at least 95% of every
    # method's validation replies finish, or the bound where none does (figures/reasoning_cap_cpu.csv: the replies of
    # every seed's adapters at the chosen settings, generated at the bound). The bound (`reasoning.CAP_UPPER_BOUND`) is
    # 256 new tokens: at 128, MIPO's validation replies fell short of 95% finished, still rising (docs/results.md). The
    # pairs are sampled with a cap of 128 (a batch stops when all its replies have ended), and max_length 256 holds a
    # prompt (at most 68 tokens on this level) with a 128-token reply.
    "cpu-reasoning": dataclasses.replace(
        _CPU,
        name="cpu-reasoning",
        description="SmolLM2-135M-Instruct bundled offline, on CPU, arithmetic at the level chosen on validation, "
                    "unconditional MIPO (random-prompt negatives), 3 seeds",
        seeds=(0, 1, 2),  # its committed run's seeds (cpu went to five after it)
        task="arithmetic_word",
        negative="random_prompt",
        n_test_prompts=200,
        temperature=0.1,
        top_p=0.9,
        max_new_tokens=128,
        max_length=256,
        eval_max_new_tokens=213,  # figures/reasoning_cap_cpu.csv: the rule's smallest cap
        eval_batch_new_tokens=48,  # most replies end by 48 tokens: the rest go on together, the batch does not wait
        eval_no_repeat_ngram=0,
    ),
}


# ------------------------------------------------------------------------------------ choices made on validation
def choices_path(preset_name: str) -> Path:
    """`figures/choices_<preset>.csv`: the settings `make tune` chose on the validation split for a preset."""
    return repo_root() / "figures" / f"choices_{preset_name}.csv"


@dataclass(frozen=True)
class Choice:
    """One row of a choices table: a field's chosen value and the settings its tuning read (`tuned_under`, field ->
    value as the tuning run had it, dtype resolved; empty for a table written before the column existed)."""

    field: str
    value: Any
    tuned_under: Mapping[str, Any]


def read_choices(path: Path) -> list[Choice]:
    """The rows of a choices table (`make tune`'s or another target's), values typed like their fields; [] without
    the file."""
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [Choice(row["field"], conform(row["field"], row["value"]), json.loads(row.get("tuned_under") or "{}"))
                for row in csv.DictReader(fh)]


def load_choices(preset_name: str, path: Path | None = None) -> dict[str, Any]:
    """`{field: value}` from a preset's committed choices (`choices_path`, or another choices table at `path`); {}
    without one."""
    return {c.field: c.value for c in read_choices(path or choices_path(preset_name))}


def typed_choices(rows: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """`{field: value}` from a choices table's (field, value) text pairs, each value typed like its field."""
    return {name: conform(name, value) for name, value in rows}


def tuning_differences(preset: Preset, tuned_under: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{field: (value tuned under, value now)}` for each field `preset` has otherwise than a tuning run had it.
    `dtype` is compared as resolved on this machine ("auto" is bf16 on a CPU with native bf16, fp32 on another)."""
    differences = {}
    for name, recorded in tuned_under.items():
        tuned = conform(name, recorded)
        now = resolved_dtype(preset) if name == "dtype" else getattr(preset, name)
        if tuned != now:
            differences[name] = (tuned, now)
    return differences


def differences_text(differences: Mapping[str, tuple[Any, Any]]) -> tuple[str, str]:
    """`tuning_differences` as two texts, `--set`'s spelling: ("dtype=float32, lora_r=8", "dtype=bfloat16, lora_r=4")."""
    names = sorted(differences)
    was, now = (", ".join(f"{f}={cli_text(differences[f][side])}" for f in names) for side in (0, 1))
    return was, now


def resolved_dtype(preset: Preset) -> str:
    """The dtype `preset.dtype` means on this machine ("auto" is bf16 on a CPU with AVX512-BF16, fp32 on one without),
    as cache keys and choices tables record it ("float32", "bfloat16"): a result must not pass for one of the other
    precision."""
    from mipo_lib.hardware import select_device, select_dtype  # torch: imported only when a choice is checked

    return str(select_dtype(select_device(), preset.dtype)).removeprefix("torch.")


# ---------------------------------------------------------------------------------------- where each value is from
@dataclass(frozen=True)
class Resolved:
    """A run's preset and where each of its values came from (`resolve_preset`)."""

    preset: Preset
    written: Preset  #: the preset as written in `PRESETS`
    sources: Mapping[str, str]  #: every field -> "preset cpu", "task gsm8k's official settings", a choices table, "--set"

    def changes(self) -> list[str]:
        """`field = value (source)`, one line per value that differs from the preset as written."""
        return [f"{name} = {cli_text(getattr(self.preset, name))} ({self.sources[name]})"
                for name in _FIELD_TYPES if getattr(self.preset, name) != getattr(self.written, name)]


def resolve_preset(name: str, overrides: Mapping[str, Any] | None = None, *, tuned: bool = True) -> Resolved:
    """The preset `name` with its layers applied in order, each winning over the ones before for the fields it sets:
    the task's official settings (with `task_defaults`), the validation choices (with `tuned`), then `overrides`,
    which always win. Says once per process when applied choices were tuned under other settings (`_say_untuned`).

    Imports the MIPO_PLUGINS modules first (see `mipo_lib.tasks`), so tasks and preferences that a researcher
    registers in a module exist in every process that asks for a preset: the command line and each notebook kernel.
    """
    from mipo_lib.tasks import load_plugins, task_settings

    load_plugins()
    try:
        written = PRESETS[name]
    except KeyError:
        raise MipoError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
    overrides = dict(overrides or {})
    path = choices_path(name)
    choices = read_choices(path) if tuned else []
    layers: list[tuple[str, Mapping[str, Any]]] = [(_shown(path), {c.field: c.value for c in choices}),
                                                   (OVERRIDE_SOURCE, overrides)]
    if conform("task_defaults", overrides.get("task_defaults", written.task_defaults)):
        task = overrides.get("task", written.task)
        layers.insert(0, (f"task {task}'s official settings", task_settings(task)))
    values: dict[str, Any] = {}
    sources = {f: f"preset {name}" for f in _FIELD_TYPES}
    for source, layer in layers:
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    preset = written.with_overrides(**values) if values else written
    _say_untuned(preset, [c for c in choices if c.field not in overrides], _shown(path), name)
    return Resolved(preset, written, sources)


def get_preset(name: str, /, *, tuned: bool = True, **overrides: Any) -> Preset:
    """Look a preset up by name and apply overrides (validated), through `resolve_preset`. Unknown names fail with the
    list of valid ones.

    `name` is positional-only, so `name` can be overridden too (`get_preset("cpu", name="cpu-beta03")` keeps a
    variant's runs in their own folder; it still takes the choices of "cpu").

    With `task_defaults` (t4, paper), the task's `official_settings` come between the preset and the overrides:
    `get_preset("t4", task="gsm8k")` samples pairs at the official temperature 0.1 / top-p 0.9 and evaluates 200
    problems, while `get_preset("t4", task="gsm8k", temperature=0.7)` keeps the caller's temperature. Only in
    `get_preset`: `Preset.with_overrides` changes exactly what it is given.

    With `tuned` (the default), the settings `make tune` chose on the validation split for this preset
    (`figures/choices_<name>.csv`: MIPO's and SFT's epochs and learning rates, CAD's strength) replace the preset's
    own values, again only for fields the caller does not set; `tuned=False` gives the preset as written (the tuning
    sweep starts there).
    """
    return resolve_preset(name, overrides, tuned=tuned).preset


_SAID: set[str] = set()
#: Fields a preset chooses after its tuning, from the tuning's own validation replies, so that the choices tables'
#: `tuned_under` holds another value by design, not by mistake: cpu-reasoning tunes at the cap's upper bound (256
#: new tokens) and then picks its evaluation cap from those replies (figures/reasoning_cap_cpu.csv).
CHOSEN_AFTER_TUNING: dict[str, tuple[str, ...]] = {"cpu-reasoning": ("eval_max_new_tokens",)}


def _say_untuned(preset: Preset, applied: list[Choice], table: str, name: str) -> None:
    """Print, once per process, which applied choices were tuned under settings this run does not have (other than
    the preset's `CHOSEN_AFTER_TUNING` fields)."""
    differences: dict[str, tuple[Any, Any]] = {}
    affected = []
    later = CHOSEN_AFTER_TUNING.get(name, ())
    for choice in applied:
        if found := {f: d for f, d in tuning_differences(preset, choice.tuned_under).items() if f not in later}:
            differences.update(found)
            affected.append(choice)
    if not affected:
        return
    was, now = differences_text(differences)
    chosen = ", ".join(f"{c.field}={cli_text(c.value)}" for c in affected)
    retune = " ".join(f"{f}={cli_text(differences[f][1])}" for f in sorted(differences))
    many = len(affected) > 1
    line = (f"{table} was tuned under {was}; this run has {now}: its {chosen} {'are' if many else 'is'} applied but "
            f"{'were' if many else 'was'} not chosen for these settings (make tune PRESET={name} SET=\"{retune}\" "
            "chooses anew, or --set them)")
    if line not in _SAID:
        _SAID.add(line)
        print(line, flush=True)


def _shown(path: Path) -> str:
    """`path` as a message names it: relative to the repository (figures/choices_cpu.csv) where it is inside."""
    return str(path.relative_to(repo_root())) if path.is_relative_to(repo_root()) else str(path)


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
