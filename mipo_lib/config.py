"""Presets: one switch from a laptop CPU to the paper's GPU settings.

Every notebook and the batch runner derive all their settings from one `Preset`, so papermill, nbval and Colab use a
single mechanism: a notebook's `parameters` cell names the preset (`PRESET`) and optional field overrides
(`OVERRIDES`, a dict), the next cell calls `get_preset(PRESET, **OVERRIDES)`; the command line fills both
(`python -m mipo_lib reproduce --preset cpu --set beta=0.3`). Settings come from the paper's official code, adapted
for LoRA/QLoRA, and from the CPU pilot.

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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

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


@dataclass(frozen=True)
class Preset:
    """All settings of one run of the workbook. Frozen: derive variants with `dataclasses.replace`."""

    name: str
    description: str
    # model
    model_id: str
    dtype: str = "auto"  # "auto" picks bf16/fp16/fp32 from the device (see hardware.select_dtype)
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    # task and data sizes
    task: str = "personalization"
    n_train_prompts: int = 120  # training prompts (request x preference for personalization)
    n_test_prompts: int = 200  # held-out evaluation prompts
    # pair generation (official code: temperature 0.1, top_p 0.9; the pilot found T=0.8 works for diversity)
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
    epochs: int = 2  # MIPO's (DPO's) epochs
    sft_epochs: int = 2  # the SFT baseline's own epochs (each method at its own best: `make tune` chooses both)
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    warmup_ratio: float = 0.03
    # evaluation
    eval_max_new_tokens: int = 48
    eval_batch_size: int = 50
    # > 0: a batch decodes its replies together for at most this many new tokens, then the unfinished ones continue
    # on their own up to eval_max_new_tokens (generate.generate_token_batches: a long cap then costs only the replies
    # that use it); 0 decodes every batch in one go
    eval_batch_new_tokens: int = 0
    # > 0: greedy evaluation may not repeat an n-gram of this length (a small model loops until the token cap otherwise)
    eval_no_repeat_ngram: int = 0
    cad_alpha: float | None = None  # context-aware decoding strength; None means 1/beta (MIPO's decode-time twin)
    seeds: tuple[int, ...] = (0, 1, 2)
    # training logs: transformers' report_to, "none" or loggers such as "tensorboard" (pip install tensorboard) or
    # "tensorboard,wandb"; TensorBoard writes under the adapter's folder (tensorboard --logdir runs/<preset>)
    report_to: str = "none"
    # True: `get_preset` takes the task's `official_settings` (the official code's sampling, token caps, test size
    # and negative for that dataset) for every field the caller does not set; the t4 and paper presets do
    task_defaults: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

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
    """How a type reads in an error message ("an integer", "comma-separated text", ...)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or none"
    if typing.get_origin(hint) is tuple:
        return f"comma-separated {'integers' if args[0] is int else 'text'}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text", dict: "a JSON object"}
    return names.get(typing.get_origin(hint) or hint, str(hint))


def cli_text(value: Any) -> str:
    """A value as `--set field=<text>` spells it (tuples comma-separated, None as none, booleans lower-case)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def conform(name: str, value: Any) -> Any:
    """`value` as field `name`'s type: text is parsed (`parse_value`), sequences (lists, arrays) become tuples, ints
    become floats where a float is declared; anything else of the wrong type fails in one line with an example of the right one."""
    return _conform(name, value, field_type(name))


def _conform(name: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, str) and hint is not str:
        return _parse(name, value, hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _conform(name, value, inner)
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and is_number and isinstance(value, numbers.Integral):
        return int(value)
    if hint is float and is_number:
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if origin is tuple and isinstance(value, Iterable) and not isinstance(value, (str, bytes, dict)):
        return tuple(_conform(name, v, args[0]) for v in value)
    if origin is dict and isinstance(value, dict):
        return dict(value)
    raise MipoError(f"preset field {name} takes {_describe(hint)}, got {value!r}{_example(name)}")


def _example(name: str) -> str:
    """"; e.g. beta=0.1": the field's default as the fix an error message suggests (nothing for fields without one)."""
    default = _DEFAULTS.get(name)
    return f"; e.g. {name}={cli_text(default)}" if default is not None else ""


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_value(name: str, text: str) -> Any:
    """Field `name`'s value from command-line text, by the field's type: `0.3`, `true`, `none`, `q_proj,v_proj`."""
    return _parse(name, text, field_type(name))


def _parse(name: str, text: str, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    word = text.strip()
    try:
        if origin in (typing.Union, types.UnionType):
            if word.lower() in ("none", "null", ""):
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return _parse(name, word, inner)
        if hint is bool:
            if word.lower() in _TRUE + _FALSE:
                return word.lower() in _TRUE
            raise ValueError(word)
        if hint in (int, float):
            return hint(word)
        if hint is str:
            return text
        if origin is tuple:
            return tuple(_parse(name, item.strip(), args[0]) for item in word.split(",") if item.strip())
        if origin is dict:
            parsed = json.loads(word)
            if isinstance(parsed, dict):
                return parsed
            raise ValueError(word)
    except (ValueError, json.JSONDecodeError):
        raise MipoError(f"preset field {name} takes {_describe(hint)}, got {text!r}{_example(name)}") from None
    raise MipoError(f"preset field {name} of type {hint} cannot be set from text; set it from Python")


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """`["beta=0.3", "seeds=0,1"]` (the command line's repeatable `--set`) as overrides `{"beta": 0.3, "seeds": (0, 1)}`."""
    overrides: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise MipoError(f"--set expects field=value (e.g. --set beta=0.3), got {item!r}")
        overrides[name.strip()] = parse_value(name.strip(), text)
    return overrides


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
        sft_epochs=1,
        batch_size=4,
        max_length=256,  # the tiny tokenizer is byte-level: chat prompts are up to 161 tokens
        eval_max_new_tokens=8,
        eval_batch_new_tokens=4,  # the tests and smoke notebooks run the two-stage evaluation decode
        eval_batch_size=20,
        seeds=(0, 1, 2),
    ),
    "cpu": Preset(
        name="cpu",
        description="SmolLM2-135M-Instruct bundled offline, on CPU, verifiable personalization, 3 seeds",
        model_id=BUNDLED_MODEL,
        dtype="auto",
        # Sized to finish 3 seeds of everything on 2 slow cores: 60 pairs (6 requests x 10 preferences), 100
        # held-out prompts (10 unseen requests x 10 preferences), batch 4; epochs and learning rates (MIPO, SFT) and
        # CAD's strength are chosen on the validation split (figures/choices_cpu.csv, `make tune`). Token caps sized
        # so that replies finish (every request asks for 2-3 sentences): greedy evaluation with no repeated 3-gram
        # (the 135M model loops otherwise). On the 40 train and validation requests, 1 context-free greedy reply
        # (2.5%) hits 192 tokens and still runs, without ending, at 1,024 (it turns into loose text: a larger cap
        # would not finish it); all others end by 151 (measured 2026-11-28).
        # Without the instruction, at 128 tokens, 40% of prompting and all context-free replies were cut. A batch
        # decodes 96 tokens together, then only its unfinished replies go on (on 100 validation prompts with context:
        # 60 s instead of 101 s, every reply identical; 64 and 128 tokens: 67 s and 65 s). Pairs are
        # sampled up to 64 tokens (a cost choice: sampling and training dominate the run; the pairs flag each reply
        # cut there, `chosen_truncated` / `rejected_truncated`).
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
    ),
    "t4": Preset(
        name="t4",
        task_defaults=True,
        description="free Colab T4 (16 GB, no bf16): Qwen2.5-1.5B-Instruct in 4-bit NF4 QLoRA, fp16 compute",
        model_id="Qwen/Qwen2.5-1.5B-Instruct",
        load_in_4bit=True,
        gradient_checkpointing=True,
        n_train_prompts=300,  # all 30 training requests x 10 preferences (10 more are the validation split)
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
        sft_epochs=1,
        batch_size=2,
        grad_accum=2,
        max_length=1024,
        eval_max_new_tokens=256,
        eval_batch_size=32,
    ),
    "paper": Preset(
        name="paper",
        task_defaults=True,
        description="24-80 GB GPU: Llama-3.2-1B-Instruct as in the paper, bf16 LoRA, official sampling settings",
        model_id="meta-llama/Llama-3.2-1B-Instruct",
        n_train_prompts=300,  # personalization has 300 training prompts; the GSM8K/ARC loaders have more
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
        sft_epochs=1,
        batch_size=4,
        grad_accum=1,
        max_length=1536,
        eval_max_new_tokens=512,
        eval_batch_size=64,
    ),
    "smoke-reasoning": Preset(
        name="smoke-reasoning",
        description="tiny random model on one-digit addition: notebook 07's plumbing in seconds, not the science",
        model_id=TINY_MODEL,
        dtype="float32",
        task="arithmetic_one_digit_add",
        negative="random_prompt",
        n_train_prompts=8,
        n_test_prompts=10,
        max_new_tokens=8,
        gen_batch_size=16,
        score_batch_size=16,
        epochs=1,
        sft_epochs=1,
        batch_size=4,
        max_length=256,
        eval_max_new_tokens=8,
        eval_batch_size=20,
    ),
}


# Notebook 07 (reasoning, `make reasoning`): unconditional MIPO, the negative is the answer to another problem. The
# cpu preset's model, precision, batch sizes and training settings; its own task, sampling and token caps.
PRESETS["cpu-reasoning"] = dataclasses.replace(
    PRESETS["cpu"],
    name="cpu-reasoning",
    description="SmolLM2-135M-Instruct bundled offline, on CPU, arithmetic at the level chosen on validation, "
                "unconditional MIPO (random-prompt negatives), 3 seeds",
    # the level whose base accuracy on validation is the lowest inside 20-70% (figures/reasoning_difficulty_cpu.csv,
    # measured with the cpu preset's model and its evaluation settings of the time, which this preset keeps:
    # greedy, 32 new tokens, batch 100, no n-gram rule)
    task="arithmetic_word",
    negative="random_prompt",
    n_test_prompts=200,
    temperature=0.1,  # the official code's math sampling
    top_p=0.9,
    max_new_tokens=32,  # one short sentence; the same cap as the evaluation
    epochs=2,  # 2 epochs of 60 pairs: 30 DPO steps (the pilot's setting, not tuned on this task)
    sft_epochs=2,
    eval_max_new_tokens=32,
    eval_no_repeat_ngram=0,
)


def choices_path(preset_name: str) -> Path:
    """`figures/choices_<preset>.csv`: the settings `make tune` chose on the validation split for a preset."""
    return repo_root() / "figures" / f"choices_{preset_name}.csv"


def load_choices(preset_name: str, path: Path | None = None) -> dict[str, Any]:
    """`{field: value}` from a preset's committed choices (`choices_path`, or another choices table at `path`), typed
    like the fields; {} without one."""
    path = path or choices_path(preset_name)
    if not path.exists():
        return {}
    with path.open(newline="") as fh:
        return typed_choices((row["field"], row["value"]) for row in csv.DictReader(fh))


def typed_choices(rows: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """`{field: value}` from a choices table's (field, value) text pairs, each value typed like its field."""
    return {name: conform(name, value) for name, value in rows}


def get_preset(name: str, /, *, tuned: bool = True, **overrides: Any) -> Preset:
    """Look a preset up by name and apply overrides (validated). Unknown names fail with the list of valid ones.

    `name` is positional-only, so `name` can be overridden too (`get_preset("cpu", name="cpu-beta03")` keeps a
    variant's runs in their own folder).

    Imports the MIPO_PLUGINS modules first (see `mipo_lib.tasks`), so tasks and preferences that a researcher
    registers in a module exist in every process that asks for a preset: the command line and each notebook kernel.

    With `task_defaults` (t4, paper), the task's `official_settings` come between the preset and the overrides:
    `get_preset("t4", task="gsm8k")` samples pairs at the official temperature 0.1 / top-p 0.9 and evaluates 200
    problems, while `get_preset("t4", task="gsm8k", temperature=0.7)` keeps the caller's temperature. Only fields the
    caller did not set are taken, and only in `get_preset`: `Preset.with_overrides` changes exactly what it is given.

    With `tuned` (the default), the settings `make tune` chose on the validation split for this preset
    (`figures/choices_<name>.csv`: MIPO's and SFT's epochs and learning rates, CAD's strength) replace the preset's
    own values, again only for fields the caller does not set; `tuned=False` gives the preset as written (the tuning
    sweep starts there).
    """
    from mipo_lib.tasks import load_plugins, task_settings

    load_plugins()
    try:
        preset = PRESETS[name]
    except KeyError:
        raise MipoError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
    if tuned:
        overrides = {**{k: v for k, v in load_choices(name).items() if k not in overrides}, **overrides}
    if conform("task_defaults", overrides.get("task_defaults", preset.task_defaults)):
        task = overrides.get("task", preset.task)
        overrides = {**{k: v for k, v in task_settings(task).items() if k not in overrides}, **overrides}
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
