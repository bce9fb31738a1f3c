"""The methods the workbook compares, as one registry: each method is one entry that every stage, table and figure reads.

A method says what trains it (a training kind, DPO, SFT or the multi-negative InfoNCE objective, with the trainer
arguments that differ from that kind's own configuration, or nothing at all), whether its prompt carries the user's
context, how it decodes (greedy, or context-aware decoding) and its colour. From that, the pipeline knows what to train
and how to evaluate, `stats` knows the display order, and `plots` the colour; adding a method or a variant is one
`register_method` call (a new loss is one entry here plus its trainer in `mipo_lib.dpo`; docs/methods.md):

    >>> from mipo_lib.methods import get_method, register_method, unregister_method
    >>> m = register_method("MIPO+CAD", slug="mipo_cad", training="dpo", decoding="cad", colour="#c44e52")
    >>> m.deterministic, m.trainer == get_method("MIPO").trainer  # trained like MIPO: one adapter serves both
    (False, True)
    >>> unregister_method("MIPO+CAD")

An adapter is keyed by its `Training` (`dpo.adapter_key`), never by the method's name, so methods that differ only in
how they decode share one trained adapter.

A method registered with `default=False` is opt-in: it is registered (`get_method` finds it, the pipeline trains and
evaluates it when named) but it is not among the methods of a full evaluation (`names`, `all_methods`, `trained`),
so the notebooks' and `make reproduce`'s method lists do not change when it is added.

Only the standard library is imported: `stats` (numpy and pandas only) reads this module too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mipo_lib.errors import MipoError

#: The training kinds `mipo_lib.dpo` runs (`dpo.train`): TRL's DPO, TRL's SFT, and the K+1-way InfoNCE contrast.
TRAININGS = ("dpo", "sft", "infonce")
#: Which weights a training updates: a LoRA adapter on the frozen base (the workbook's default), or every parameter of
#: the model ("full": the paper's regime; DPO only, `mipo_lib.dpo.train_dpo`).
WEIGHTS = ("lora", "full")
DECODINGS = ("greedy", "cad")
_SLUG = re.compile(r"[a-z0-9][a-z0-9_]*")  # no "-": file names join the slug and a digest with "-"
_HEX_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")


@dataclass(frozen=True)
class Training:
    """What trains an adapter: the training kind (one of `TRAININGS`) and the trainer arguments that differ from that
    kind's own configuration (`dpo.dpo_config_kwargs`, `dpo.sft_config_kwargs`), e.g. `(("loss_type", "ipo"),)`.

    It is all an adapter's cache key knows of a method (`dpo.adapter_key`): two methods with equal trainings share
    one adapter, whatever their names or decodings."""

    kind: str
    args: tuple[tuple[str, Any], ...] = ()  # sorted (name, value) pairs: hashable, so a Training can key a dict
    weights: str = "lora"  # one of `WEIGHTS`: a LoRA adapter, or full fine-tuning

    @classmethod
    def of(cls, kind: str, args: Mapping[str, Any] | None = None, weights: str = "lora") -> Training:
        """The training of `kind` with trainer arguments `args` (checked and frozen as `args` pairs)."""
        return cls(kind, _frozen_args(args or {}), weights)

    @property
    def arguments(self) -> dict[str, Any]:
        """The trainer arguments as keyword arguments."""
        return dict(self.args)


@dataclass(frozen=True)
class Method:
    """One method: its display name and everything a stage needs to train, evaluate, order and draw it."""

    name: str  # display name in tables and figures, and the `method` column of the records
    slug: str  # file-safe short name in its evaluation files' names (adapters are named by their training)
    training: str | None  # the training kind ("dpo", "sft", "infonce"), or None for an untrained method (the base model)
    with_context: bool  # whether the evaluation prompt carries the user's context
    decoding: str  # "greedy", or "cad": context-aware decoding with strength `preset.cad_strength`
    colour: str  # "#rrggbb" in every figure
    trainer_args: tuple[tuple[str, Any], ...] = ()  # see `Training.args`
    default: bool = True  # part of a full evaluation (`names`); False: opt-in, run only when named
    weights: str = "lora"  # see `Training.weights`

    @property
    def trainer(self) -> Training | None:
        """What trains this method's adapter (None: untrained)."""
        return None if self.training is None else Training(self.training, self.trainer_args, self.weights)

    @property
    def deterministic(self) -> bool:
        """Both decodings are greedy, so only training (seeded) makes results differ between seeds: an untrained
        method is evaluated once and its records are repeated for every seed."""
        return self.training is None


_REGISTRY: dict[str, Method] = {}


def register_method(
    name: str,
    *,
    slug: str,
    training: str | None = None,
    trainer_args: Mapping[str, Any] | None = None,
    with_context: bool = True,
    decoding: str = "greedy",
    colour: str,
    default: bool = True,
    weights: str = "lora",
) -> Method:
    """Add a method (appended to the display order) and return it; a taken name or slug, or an invalid value,
    raises a `MipoError` that names the fix.

    `trainer_args` are passed to the training kind's trainer config on top of its own (for "dpo": TRL's `DPOConfig`,
    e.g. `{"loss_type": "ipo"}`); TRL checks the names when the trainer is built. `default=False` registers an opt-in
    method (module docstring). `weights="full"` trains every parameter instead of a LoRA adapter (DPO only)."""
    if name in _REGISTRY:
        raise MipoError(f"method {name!r} is already registered; pick another name or unregister_method({name!r}) first")
    if not _SLUG.fullmatch(slug):
        raise MipoError(f"slug {slug!r} is not file-safe; use lower-case letters, digits and '_' (e.g. 'mipo_cad')")
    if taken := [m.name for m in _REGISTRY.values() if m.slug == slug]:
        raise MipoError(f"slug {slug!r} is taken by {taken[0]!r}; cache files would collide, pick another")
    if training is not None and training not in TRAININGS:
        raise MipoError(f"training {training!r} is unknown; use one of {TRAININGS} or None (untrained)")
    if trainer_args and training is None:
        raise MipoError(f"method {name!r} has trainer_args but no training; give it a training kind or drop them")
    if weights not in WEIGHTS:
        raise MipoError(f"weights {weights!r} is unknown; use one of {WEIGHTS}")
    if weights == "full" and training != "dpo":
        raise MipoError(f"weights='full' (full fine-tuning) is implemented for training='dpo' only, not {training!r}")
    if decoding not in DECODINGS:
        raise MipoError(f"decoding {decoding!r} is unknown; use one of {DECODINGS}")
    if decoding == "cad" and not with_context:
        raise MipoError("context-aware decoding contrasts the prompt with and without the context; set with_context=True")
    if not _HEX_COLOUR.fullmatch(colour):
        raise MipoError(f"colour {colour!r} must be written '#rrggbb' (e.g. '#c44e52')")
    method = Method(name, slug, training, with_context, decoding, colour, _frozen_args(trainer_args or {}), default, weights)
    _REGISTRY[name] = method
    return method


def _frozen_args(args: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Trainer arguments as sorted pairs. Values must be JSON values that hash (a tuple, not a list): they go into
    the adapter's cache key and make the method hashable."""
    for arg, value in args.items():
        try:
            hash(value)
            json.dumps(value)
        except TypeError:
            raise MipoError(f"trainer argument {arg}={value!r} must be a string, number, bool or tuple of them") from None
    return tuple(sorted(args.items()))


def unregister_method(name: str) -> None:
    """Remove a method (tests add and remove their own)."""
    get_method(name)
    del _REGISTRY[name]


def get_method(name: str) -> Method:
    """The registered method called `name`; an unknown name fails with the list of registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MipoError(f"unknown method {name!r}; registered: {', '.join(_REGISTRY)} (add one with register_method)") from None


def all_methods(*, opt_in: bool = False) -> tuple[Method, ...]:
    """The methods of a full evaluation in display order (registration order); `opt_in=True` adds the opt-in ones."""
    return tuple(m for m in _REGISTRY.values() if m.default or opt_in)


def names(*, opt_in: bool = False) -> tuple[str, ...]:
    """Display names in display order: the methods a full evaluation runs, the order of tables and figures
    (`opt_in=True`: every registered method)."""
    return tuple(m.name for m in all_methods(opt_in=opt_in))


def trained(*, opt_in: bool = False) -> tuple[Method, ...]:
    """The methods of a full evaluation with a training stage (their adapters are trained per seed)."""
    return tuple(m for m in all_methods(opt_in=opt_in) if m.training is not None)


# The workbook's methods: what the user gets without personalization, the paper's main baseline (context in
# the prompt), the SFT baseline, MIPO itself, and MIPO's decode-time twin (CAD with a = 1/beta).
register_method("base (no context)", slug="base", with_context=False, colour="#9e9e9e")
register_method("prompting", slug="prompting", colour="#4c72b0")
register_method("SFT", slug="sft", training="sft", colour="#dd8452")
register_method("MIPO", slug="mipo", training="dpo", colour="#55a868")
register_method("CAD", slug="cad", decoding="cad", colour="#8172b3")
# Opt-in: the K+1-way InfoNCE contrast over a prompt's K negatives (SAMI-style), the multi-negative objective whose bound
# notebook 01 derives; run it by name, with k_negatives > 1 (docs/methods.md).
register_method("MIPO-InfoNCE", slug="mipo_infonce", training="infonce", colour="#c44e52", default=False)
# Opt-in: the paper's regime, DPO on every parameter of the model instead of a LoRA adapter (`make regime`, notebook 05).
register_method("MIPO (full fine-tuning)", slug="mipo_full", training="dpo", weights="full", colour="#2ca02c",
                default=False)
