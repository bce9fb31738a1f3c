"""The methods the workbook compares, as one registry: each method is one entry that every stage, table and figure reads.

A method says how it is trained (DPO, SFT or not at all), whether its prompt carries the user's context, how it decodes
(greedy, or context-aware decoding) and its colour. From that, the pipeline knows what to train and how to evaluate,
`stats` knows the display order, and `plots` the colour; adding a method or a variant is one `register_method` call:

    >>> from mipo_lib.methods import register_method, unregister_method
    >>> m = register_method("MIPO+CAD", slug="mipo_cad", training="dpo", decoding="cad", colour="#c44e52")
    >>> m.deterministic
    False
    >>> unregister_method("MIPO+CAD")

Only the standard library is imported: `stats` (numpy and pandas only) reads this module too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mipo_lib.errors import MipoError

TRAININGS = ("dpo", "sft")
DECODINGS = ("greedy", "cad")
_SLUG = re.compile(r"[a-z0-9][a-z0-9_]*")  # no "-": file names join the slug and a digest with "-"
_HEX_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")


@dataclass(frozen=True)
class Method:
    """One method: its display name and everything a stage needs to train, evaluate, order and draw it."""

    name: str  # display name in tables and figures, and the `method` column of the records
    slug: str  # file-safe short name used in cache file and folder names
    training: str | None  # "dpo", "sft", or None for an untrained method (the base model as is)
    with_context: bool  # whether the evaluation prompt carries the user's context
    decoding: str  # "greedy", or "cad": context-aware decoding with strength `preset.cad_strength`
    colour: str  # "#rrggbb" in every figure

    @property
    def deterministic(self) -> bool:
        """Both decodings are greedy, so only training (seeded) makes results differ between seeds: an untrained
        method is evaluated once and its records are repeated for every seed."""
        return self.training is None


_REGISTRY: dict[str, Method] = {}


def register_method(
    name: str, *, slug: str, training: str | None = None, with_context: bool = True, decoding: str = "greedy", colour: str
) -> Method:
    """Add a method (appended to the display order) and return it; a taken name or slug, or an invalid value,
    raises a `MipoError` that names the fix."""
    if name in _REGISTRY:
        raise MipoError(f"method {name!r} is already registered; pick another name or unregister_method({name!r}) first")
    if not _SLUG.fullmatch(slug):
        raise MipoError(f"slug {slug!r} is not file-safe; use lower-case letters, digits and '_' (e.g. 'mipo_cad')")
    if taken := [m.name for m in _REGISTRY.values() if m.slug == slug]:
        raise MipoError(f"slug {slug!r} is taken by {taken[0]!r}; cache files would collide, pick another")
    if training is not None and training not in TRAININGS:
        raise MipoError(f"training {training!r} is unknown; use one of {TRAININGS} or None (untrained)")
    if decoding not in DECODINGS:
        raise MipoError(f"decoding {decoding!r} is unknown; use one of {DECODINGS}")
    if decoding == "cad" and not with_context:
        raise MipoError("context-aware decoding contrasts the prompt with and without the context; set with_context=True")
    if not _HEX_COLOUR.fullmatch(colour):
        raise MipoError(f"colour {colour!r} must be written '#rrggbb' (e.g. '#c44e52')")
    method = Method(name, slug, training, with_context, decoding, colour)
    _REGISTRY[name] = method
    return method


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


def all_methods() -> tuple[Method, ...]:
    """Every registered method, in display order (registration order)."""
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    """Display names in display order: the methods a full evaluation runs, the order of tables and figures."""
    return tuple(_REGISTRY)


def trained() -> tuple[Method, ...]:
    """The methods with a training stage (their adapters are trained per seed)."""
    return tuple(m for m in _REGISTRY.values() if m.training is not None)


# The workbook's methods: what the user gets without personalization, the paper's main baseline (context in
# the prompt), the SFT baseline, MIPO itself, and MIPO's decode-time twin (CAD with a = 1/beta).
register_method("base (no context)", slug="base", with_context=False, colour="#9e9e9e")
register_method("prompting", slug="prompting", colour="#4c72b0")
register_method("SFT", slug="sft", training="sft", colour="#dd8452")
register_method("MIPO", slug="mipo", training="dpo", colour="#55a868")
register_method("CAD", slug="cad", decoding="cad", colour="#8172b3")
