"""Exercises a student fills in and a teacher grades: checkers that say "right", or what is wrong with a hint (never
the expected numbers), or "not done yet".

An exercise in a notebook is three cells, placed before any code of the notebook that would give its answer away:
its statement (a markdown cell tagged ``exercise``), a **stub** (tag ``stub``) that defines a function raising
`NotImplementedError`, and a **check** cell that calls the exercise's checker from this module. The numbered
notebooks are the student edition: run top to bottom, every check says "not done yet". The solutions live in
``notebooks/solutions/`` (`mipo_lib.workbook.editions` builds those notebooks around the same statements and checks),
and `mipo_lib.workbook.grade` runs submitted stubs through the checkers. `EXERCISES` lists every exercise.

Each checker runs the student's function on small seeded inputs, compares it with a reference implementation, and,
when they differ, tries the usual mistakes one by one. Where the exercise is to write what a library function already
computes (`mi.conditional_pmi`, `pairs.derangement`, `reasoning.choose_level`, ...), that function refuses to run
while the student's function runs: its code object is swapped for one that raises (`_library_refuses`), so no alias
can reach the original, neither `from mipo_lib.mi import conditional_pmi as f`, `import mipo_lib.mi as m`, nor a
name bound before the check.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mipo_lib import mi
from mipo_lib.errors import MipoError

__all__ = [
    "NOT_DONE",
    "Verdict",
    "Exercise",
    "EXERCISES",
    "LibraryCall",
    "check_sequence_logprob",
    "check_mipo_pairs",
    "check_conditional_pmi",
    "check_world_summary",
    "check_pmi_and_kl",
    "check_log_partition",
    "check_sattolo",
    "check_ends_with_question",
    "check_dpo_pair",
    "check_logged_rewards",
    "check_lora_dpo_step",
    "check_kl_estimates",
    "check_compute_matched",
    "check_choose_level",
    "check_identical_pairs",
    "check_cad_scores",
    "check_short_sentences",
    "check_bootstrap_ci",
    "check_pairing_widths",
]

NOT_DONE = "not done yet"


@dataclass(frozen=True)
class Verdict:
    """A checker's answer: ``ok`` is True (right), False (wrong, with a hint) or None (the stub is untouched)."""

    ok: bool | None
    message: str

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:  # the check cell's last expression: show the sentence, not the dataclass
        return self.message


# ------------------------------------------------------------------------- library functions that refuse to run
class LibraryCall(Exception):
    """Raised by a library function that an exercise asks the student to write, called while the student's function
    runs (the message names the function)."""


_LIBRARY_CALLS: list[str] = []  # what the student's function called, even if it caught the exception


def _refuse(*args: Any, **kwargs: Any) -> Any:
    """The code a forbidden function runs instead of its own. It executes with the *library* module's globals (the
    function object keeps them), so it imports what it needs locally; `_refusing_code` names it after the function."""
    from mipo_lib.workbook.exercises import _refused

    _refused()


def _refused() -> None:
    code = sys._getframe(1).f_code  # the forbidden function's frame: _refuse's code under the function's names
    name = f"{code.co_filename.strip('<>')}.{code.co_qualname}"
    _LIBRARY_CALLS.append(name)
    raise LibraryCall(name)


def _refusing_code(fn: types.FunctionType) -> types.CodeType:
    return _refuse.__code__.replace(co_name=fn.__name__, co_qualname=fn.__qualname__, co_filename=f"<{fn.__module__}>")


def _library_functions(dotted: str) -> list[types.FunctionType]:
    """The functions `dotted` names: every function a module defines (`mipo_lib.mi`), or one function or method
    (`mipo_lib.pairs.derangement`, `mipo_lib.evaluate.ContextAwareDecoding.__call__`), unwrapped from decorators."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            target = getattr(target, attr)
        break
    else:
        raise MipoError(f"no module in {dotted!r}: name a library module or function, e.g. 'mipo_lib.mi.pmi'")
    if isinstance(target, types.ModuleType):
        found = [inspect.unwrap(f) for f in vars(target).values()
                 if isinstance(f, types.FunctionType) and f.__module__ == target.__name__]
    else:
        found = [inspect.unwrap(target)]
    for fn in found:
        if not isinstance(fn, types.FunctionType) or fn.__code__.co_freevars:
            raise MipoError(f"{dotted!r} cannot be made to refuse: name a plain Python function or a module")
    return found


@contextmanager
def _library_refuses(names: Sequence[str]) -> Iterator[None]:
    """While the block runs, every function of `names` raises `LibraryCall` instead of computing.

    Swapping `__code__` changes the function object itself, which every alias shares; the originals are back when
    the block ends, also when it raises."""
    functions = {id(f): f for name in names for f in _library_functions(name)}.values()
    saved = [(f, f.__code__) for f in functions]
    _LIBRARY_CALLS.clear()
    for f in functions:
        f.__code__ = _refusing_code(f)
    try:
        yield
    finally:
        for f, code in saved:
            f.__code__ = code


def _run(fn: Callable[..., Any], *args: Any, forbid: Sequence[str] = ()) -> tuple[Any, Verdict | None]:
    """Call the student's function, with the library functions `forbid` names refusing to run; an untouched stub
    (NotImplementedError or None) is "not done yet", a call of a forbidden function is wrong whatever it returned,
    and any other exception is reported as what it is, so the check cell never crashes."""
    with _library_refuses(forbid):
        try:
            out = fn(*args)
        except NotImplementedError:
            return None, Verdict(None, f"{NOT_DONE}: replace the `raise NotImplementedError` in the stub with your code")
        except Exception as exc:  # noqa: BLE001 - a student's bug is a verdict, not a crash of the check cell
            if not _LIBRARY_CALLS:
                return None, Verdict(False, f"your function raised {type(exc).__name__}: {exc}")
    if _LIBRARY_CALLS:
        return None, Verdict(False, f"not yet: your function calls the library's `{_LIBRARY_CALLS[0]}`, which computes "
                                    "this exercise's answer: write it yourself")
    if out is None:
        return None, Verdict(None, f"{NOT_DONE}: the function returns None (did you forget `return`?)")
    return out, None


#: The library functions each exercise asks the student to write (refusing to run while the student's function runs).
_MI = ("mipo_lib.mi",)
_DERANGEMENTS = ("mipo_lib.pairs.derangement", "mipo_lib.pairs.grouped_derangement", "mipo_lib.pairs.negative_sources")
_SCORING = ("mipo_lib.scoring",)
_DPO_STEP = ("mipo_lib.scoring", "mipo_lib.dpo")
_CAD = ("mipo_lib.evaluate.ContextAwareDecoding.__call__",)
_STATS = ("mipo_lib.analysis.stats",)
_CHOOSE_LEVEL = ("mipo_lib.experiments.reasoning.choose_level",)


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _close(a: np.ndarray, b: np.ndarray, tol: float = 1e-6) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, atol=tol, rtol=1e-6))


# ------------------------------------------------------------------------------ masked sequence log-probability
def _toy_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [B, T, V], token ids [B, T], a reply mask [B, T] (1 on reply tokens; prompt and right padding 0) and
    the attention mask (1 on prompt and reply tokens), with different prompt and reply lengths per row."""
    gen = torch.Generator().manual_seed(seed)
    batch, length, vocab = 3, 9, 11
    logits = 3.0 * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.long)
    attention = torch.zeros(batch, length, dtype=torch.long)
    for b, (prompt, reply) in enumerate([(3, 4), (2, 7), (4, 2)]):
        mask[b, prompt:prompt + reply] = 1
        attention[b, :prompt + reply] = 1
    return logits, ids, mask, attention


def _reference_sequence_logprob(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(-1)


def check_sequence_logprob(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]) -> Verdict:
    """Check ``fn(logits, input_ids, reply_mask) -> [batch]``: the summed log-probability of each row's reply tokens.

    The masked sequence log-prob is what DPO's log pi(y|x) is: logits at position t predict token t+1, prompt and
    padding tokens are excluded, the reply's token log-probs are summed (not averaged).
    """
    logits, ids, mask, attention = _toy_batch()
    out, verdict = _run(fn, logits.clone(), ids.clone(), mask.clone(), forbid=_SCORING)
    if verdict:
        return verdict
    got, want = _as_array(out), _as_array(_reference_sequence_logprob(logits, ids, mask))
    if got.shape != want.shape:
        return Verdict(False, f"expected one number per row, shape {want.shape}; got shape {got.shape}")
    if _close(got, want):
        return Verdict(True, "right: prompt tokens excluded, logits shifted by one, reply log-probs summed")
    logp_all = torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    shifted = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    raw = logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    mistakes = [
        ((logp_all * mask).sum(-1), "logits at position t predict token t+1: shift them against the token ids"),
        ((shifted * attention[:, 1:]).sum(-1), "the prompt's tokens are counted: keep only the reply's (the mask)"),
        ((shifted * mask[:, 1:]).sum(-1) / mask[:, 1:].sum(-1), "that is the mean per token: DPO sums the reply's log-probs"),
        ((raw * mask[:, 1:]).sum(-1), "those are raw logits: take log_softmax over the vocabulary first"),
        ((shifted * mask[:, :-1]).sum(-1), "the mask is not shifted with the tokens: token t+1 belongs to the reply when mask[t+1] is 1"),
    ]
    for candidate, hint in mistakes:
        if _close(got, _as_array(candidate)):
            return Verdict(False, f"not yet: {hint}")
    return Verdict(False, "not yet: the numbers differ from the summed reply log-probs; check the shift, the mask and the sum")


# --------------------------------------------------------------------------------------------- MIPO pairs
def check_mipo_pairs(fn: Callable[[Sequence[str], Sequence[str], np.random.Generator], Any]) -> Verdict:
    """Check ``fn(prompts, positives, rng) -> list of (prompt, chosen, rejected)``: one MIPO pair per prompt whose
    rejected reply is the positive of another prompt, chosen by a random derangement (no prompt gets its own reply,
    every positive is used once as a negative), drawn from ``rng``."""
    n = 7
    prompts = [f"prompt {i}" for i in range(n)]
    positives = [f"reply to prompt {i}" for i in range(n)]
    draws = []
    for seed in range(6):
        out, verdict = _run(fn, list(prompts), list(positives), np.random.default_rng(seed), forbid=_DERANGEMENTS)
        if verdict:
            return verdict
        try:
            triples = [tuple(t) for t in out]
        except TypeError:
            return Verdict(False, "return a list of (prompt, chosen, rejected) triples")
        if len(triples) != n or any(len(t) != 3 for t in triples):
            return Verdict(False, f"expected {n} triples (prompt, chosen, rejected), one per prompt; got {len(triples)}")
        if [t[0] for t in triples] != prompts:
            return Verdict(False, "not yet: keep the prompts in their order, one pair per prompt")
        if [t[1] for t in triples] != positives:
            return Verdict(False, "not yet: the chosen reply of a prompt is that prompt's own positive")
        rejected = [t[2] for t in triples]
        if any(r not in positives for r in rejected):
            return Verdict(False, "not yet: a rejected reply must be one of the other prompts' positives")
        if any(r == c for _, c, r in triples):
            return Verdict(False, "not yet: some prompt got its own reply as the rejected one (a fixed point): "
                                  "a pair with chosen == rejected teaches nothing; use a permutation without fixed points")
        if len(set(rejected)) != n:
            return Verdict(False, "not yet: some positive is used twice as a negative and another never: use a permutation")
        draws.append(tuple(rejected))
    if len(set(draws)) == 1:
        return Verdict(False, "not yet: every seed gives the same pairing: draw the permutation from `rng`")
    return Verdict(True, "right: a random derangement, every prompt paired with another prompt's reply")


# ---------------------------------------------------------------------------------------- conditional PMI
def check_conditional_pmi(fn: Callable[[np.ndarray, np.ndarray], Any]) -> Verdict:
    """Check ``fn(pi0_c, pc_given_x) -> table [x, c, y]``: ``log pi0(y|x,c) - log sum_c' p(c'|x) pi0(y|x,c')``, the
    personalization reward of random-context negatives (the conditional-MI step of notebook 01)."""
    rows, _ = mi.random_world(6, 5, 0.5, seed=3)
    pi0_c = rows.reshape(2, 3, 5)
    pc = np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])  # not uniform: catches a plain mean over contexts
    out, verdict = _run(fn, pi0_c.copy(), pc.copy(), forbid=_MI)
    if verdict:
        return verdict
    got, want = _as_array(out), mi.conditional_pmi(pi0_c, pc)
    if got.shape != want.shape:
        return Verdict(False, f"expected a table [x, c, y] of shape {want.shape}; got shape {got.shape}")
    if _close(got, want):
        return Verdict(True, "right: the conditional PMI against the mixture over this request's contexts")
    log_p = np.log(pi0_c)
    over_all = np.einsum("xc,xcy->y", pc / pc.shape[0], pi0_c)  # mixes requests too (uniform p(x))
    mistakes = [
        (log_p - np.log(pi0_c.mean(axis=1))[:, None, :], "the mixture weighs each context by p(c'|x), not equally"),
        (log_p - np.log(over_all)[None, None, :], "the mixture is over the contexts of the *same* request x, not over requests"),
        (-want, "the sign is flipped: log pi0(y|x,c) comes first"),
        (pi0_c / np.einsum("xc,xcy->xy", pc, pi0_c)[:, None, :], "that is the ratio itself: take its log"),
    ]
    for candidate, hint in mistakes:
        if _close(got, candidate):
            return Verdict(False, f"not yet: {hint}")
    return Verdict(False, "not yet: the table differs from log pi0(y|x,c) - log E_{c'~p(.|x)} pi0(y|x,c')")


def _first_mistake(got: np.ndarray, mistakes: Sequence[tuple[Any, str]], tol: float = 1e-6) -> Verdict | None:
    for candidate, hint in mistakes:
        if _close(got, _as_array(candidate), tol):
            return Verdict(False, f"not yet: {hint}")
    return None


def _parts(out: Any, n: int, what: str) -> tuple[list[Any] | None, Verdict | None]:
    """Split a returned tuple into its `n` parts, or say what shape was expected."""
    try:
        parts = list(out)
    except TypeError:
        return None, Verdict(False, f"return {n} things: {what}")
    if len(parts) != n:
        return None, Verdict(False, f"return {n} things ({what}); got {len(parts)}")
    return parts, None


def _two_numbers(out: Any, what: str) -> tuple[np.ndarray | None, Verdict | None]:
    """A returned pair as two floats (`_parts`, then each part's first element), or the verdict saying what is wrong."""
    parts, verdict = _parts(out, 2, what)
    if verdict:
        return None, verdict
    try:
        return np.array([float(_as_array(x).ravel()[0]) for x in parts]), None
    except (IndexError, TypeError, ValueError):
        return None, Verdict(False, f"return two numbers: {what}")


# ------------------------------------------------------------------- notebook 01: a small world, by the formulas
def _small_worlds() -> list[tuple[np.ndarray, np.ndarray, float]]:
    """The exercise's 2 x 2 world at beta 1, and a 3 x 4 world with a non-uniform p(x) at beta 1/2."""
    hand = (np.array([[4, 1], [2, 3]]) / 5.0, np.array([1.0, 1.0]) / 2, 1.0)
    rows, _ = mi.random_world(3, 4, 0.7, seed=11)
    return [hand, (rows, np.array([0.5, 0.3, 0.2]), 0.5)]


def check_world_summary(fn: Callable[[np.ndarray, np.ndarray, float], Any]) -> Verdict:
    """Check ``fn(pi0, px, beta) -> (marginal, mutual_information, optimum)``: the marginal pi0(y), I0(X;Y) in nats
    and MIPO's optimum table pi*(y|x), on the exercise's 2 x 2 world and on a 3 x 4 world with a non-uniform p(x)."""
    for pi0, px, beta in _small_worlds():
        out, verdict = _run(fn, pi0.copy(), px.copy(), beta, forbid=_MI)
        if verdict:
            return verdict
        parts, verdict = _parts(out, 3, "the marginal, the mutual information and the optimum table")
        if verdict:
            return verdict
        marg, info, opt = (_as_array(x) for x in parts)
        want_m, want_i, want_o = mi.marginal(pi0, px), mi.mutual_information(pi0, px), mi.mipo_optimum(pi0, px, beta)
        if not _close(marg, want_m):
            return _first_mistake(marg, [
                (pi0.mean(axis=0), "the marginal weighs each prompt by p(x), not equally"),
                (pi0.sum(axis=1), "the marginal sums over prompts x, one number per response y"),
            ]) or Verdict(False, "not yet: the marginal differs from sum_x p(x) pi0(y|x)")
        if info.size != 1:
            return Verdict(False, f"the mutual information is one number (averaged over prompts); got shape {info.shape}")
        info = info.reshape(1)
        if not _close(info, np.array([want_i])):
            pmi_t = mi.pmi(pi0, px)
            return _first_mistake(info, [
                ([want_i / math.log(2)], "that is in bits: the workbook measures information in nats (natural log)"),
                ([-want_i], "the sign is flipped: pmi = log pi0(y|x) - log pi0(y)"),
                ([float(np.sum(pi0 * pmi_t))], "weigh each prompt's row by p(x) too (the joint is p(x) pi0(y|x))"),
                ([float(np.sum(px[:, None] * pmi_t))], "average the PMI under the joint p(x) pi0(y|x), not a plain sum over y"),
            ]) or Verdict(False, "not yet: the mutual information differs from E_{p(x) pi0(y|x)}[pmi0(x;y)]")
        if not _close(opt, want_o):
            m = mi.marginal(pi0, px)
            unnorm = pi0 ** (1 + 1 / beta) / m[None, :] ** (1 / beta)
            no_one = (pi0 / m[None, :]) ** (1 / beta)
            return _first_mistake(opt, [
                (unnorm, "normalise the optimum: each prompt's row must sum to 1"),
                (no_one / no_one.sum(axis=1, keepdims=True),
                 "the tilt multiplies pi0(y|x): pi* is pi0(y|x) exp(pmi0/beta), normalised per prompt"),
                (mi.tilt(pi0, np.broadcast_to(m, pi0.shape), 1 / beta),
                 "beta divides the PMI in the exponent (a small beta sharpens), it does not multiply it"),
            ]) or Verdict(False, "not yet: the optimum differs from pi0(y|x) exp(pmi0(x;y)/beta) / Z(x)")
    return Verdict(True, "right: marginal, mutual information (nats) and the MIPO optimum all match")


def _tilted(pi0: np.ndarray, px: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    return mi.mipo_optimum(pi0, px, beta), mi.pmi(pi0, px)


def check_pmi_and_kl(fn: Callable[[np.ndarray, np.ndarray, float], Any]) -> Verdict:
    """Check ``fn(pi0, px, beta) -> (expected_pmi, kl)``: under MIPO's optimum pi*, the expected base-model PMI
    ``sum_x p(x) sum_y pi*(y|x) pmi0(x;y)`` and ``sum_x p(x) KL(pi*(.|x) || pi0(.|x))``, both in nats."""
    rows, _ = mi.random_world(3, 5, 1.0, seed=5)
    px = np.array([0.6, 0.3, 0.1])
    for beta in (0.5, 1.0, 2.0):
        out, verdict = _run(fn, rows.copy(), px.copy(), beta, forbid=_MI)
        if verdict:
            return verdict
        got, verdict = _two_numbers(out, "the expected PMI and the KL")
        if verdict:
            return verdict
        opt, pmi_t = _tilted(rows, px, beta)
        kl_rows = np.sum(opt * (np.log(opt) - np.log(rows)), axis=1)
        want = np.array([np.sum(px[:, None] * opt * pmi_t), np.sum(px * kl_rows)])
        if _close(got, want):
            continue
        reverse = np.sum(px * np.sum(rows * (np.log(rows) - np.log(opt)), axis=1))
        if not _close(got[:1], want[:1]):
            return _first_mistake(got[:1], [
                ([np.sum(px[:, None] * rows * pmi_t)], "that is the expectation under pi0 (the base model's I0): "
                                                        "take it under the optimum pi*"),
                ([np.mean(np.sum(opt * pmi_t, axis=1))], "weigh each prompt by p(x), not equally"),
            ]) or Verdict(False, "not yet: the expected PMI differs from sum_x p(x) sum_y pi*(y|x) pmi0(x;y)")
        return _first_mistake(got[1:], [
            ([reverse], "KL is not symmetric: the question asks for KL(pi* || pi0), the expectation under pi*"),
            ([np.mean(kl_rows)], "weigh each prompt's KL by p(x), not equally"),
            ([np.sum(px * kl_rows) / math.log(2)], "that is in bits: use the natural log (nats)"),
        ]) or Verdict(False, "not yet: the KL differs from sum_x p(x) sum_y pi*(y|x) log(pi*(y|x) / pi0(y|x))")
    return Verdict(True, "right: expected PMI and KL of the optimum, both weighted by p(x), in nats")


def _reference_log_partition(pi0: np.ndarray, px: np.ndarray, beta: float) -> np.ndarray:
    return np.logaddexp.reduce(np.log(pi0) + mi.pmi(pi0, px) / beta, axis=1)


def check_log_partition(fn: Callable[[np.ndarray, np.ndarray, float], Any]) -> Verdict:
    """Check ``fn(pi0, px, beta) -> log Z(x)``, one number per prompt: ``log sum_y pi0(y|x) exp(pmi0(x;y)/beta)``,
    computed so that it does not overflow when beta is small (the PMI of a rare response can be large)."""
    rows, _ = mi.random_world(4, 6, 0.3, seed=2)
    px = np.array([0.4, 0.3, 0.2, 0.1])
    for beta in (1.0, 0.3):
        out, verdict = _run(fn, rows.copy(), px.copy(), beta, forbid=_MI)
        if verdict:
            return verdict
        got, want = _as_array(out), _reference_log_partition(rows, px, beta)
        if got.shape != want.shape:
            return Verdict(False, f"expected one number per prompt, shape {want.shape}; got shape {got.shape}")
        if _close(got, want):
            continue
        pmi_t = mi.pmi(rows, px)
        return _first_mistake(got, [
            (np.exp(want), "that is Z(x) itself: return its log"),
            (np.logaddexp.reduce(pmi_t / beta, axis=1), "weigh exp(pmi/beta) by pi0(y|x): Z(x) is an expectation under pi0(.|x)"),
            (np.logaddexp.reduce(np.log(rows) + pmi_t * beta, axis=1), "divide the PMI by beta, do not multiply"),
        ]) or Verdict(False, "not yet: the numbers differ from log sum_y pi0(y|x) exp(pmi0(x;y)/beta)")
    # a tiny beta: exp(pmi / beta) overflows float64 unless the sum is taken in log space
    beta = 0.002
    out, verdict = _run(fn, rows.copy(), px.copy(), beta, forbid=_MI)
    if verdict:
        return verdict
    got = _as_array(out)
    if not np.all(np.isfinite(got)):
        return Verdict(False, "not yet: right for moderate beta, but at beta = 0.002 exp(pmi/beta) overflows: "
                              "sum in log space (np.logaddexp.reduce, or subtract the row's maximum first)")
    if not _close(got, _reference_log_partition(rows, px, beta), tol=1e-6 * 1e3):
        return Verdict(False, "not yet: right for moderate beta, but not at a tiny beta: check the log-space sum")
    return Verdict(True, "right: log Z(x) per prompt, stable even at tiny beta")


# ---------------------------------------------------------------- notebook 02: Sattolo's algorithm, a preference
def _cycle_lengths(perm: np.ndarray) -> list[int]:
    seen, lengths = np.zeros(len(perm), dtype=bool), []
    for start in range(len(perm)):
        if seen[start]:
            continue
        length, i = 0, start
        while not seen[i]:
            seen[i], i, length = True, int(perm[i]), length + 1
        lengths.append(length)
    return lengths


def check_sattolo(fn: Callable[[int, np.random.Generator], Any]) -> Verdict:
    """Check ``fn(n, rng) -> permutation of range(n)`` implements Sattolo's algorithm: always a single n-cycle (so
    never a fixed point), drawn from `rng`, every n-cycle possible."""
    outputs = {}
    for n in (2, 4, 7):
        for seed in range(60):
            out, verdict = _run(fn, n, np.random.default_rng(seed), forbid=_DERANGEMENTS)
            if verdict:
                return verdict
            perm = np.asarray(out)
            if perm.shape != (n,) or sorted(perm.tolist()) != list(range(n)):
                return Verdict(False, f"return a permutation of 0..{n - 1} (an array of length {n})")
            if np.any(perm == np.arange(n)):
                return Verdict(False, "not yet: a fixed point (perm[i] == i): position i may only swap with a "
                                      "position j < i, strictly (Fisher-Yates also allows j == i)")
            if _cycle_lengths(perm) != [n]:
                return Verdict(False, "not yet: no fixed point, but the permutation splits into several cycles: "
                                      "Sattolo's output is always one cycle through all n positions (is j drawn "
                                      "below i, from the same growing prefix, in one pass?)")
            outputs.setdefault(n, set()).add(tuple(perm.tolist()))
    if len(outputs[7]) == 1:
        return Verdict(False, "not yet: every seed gives the same permutation: draw j from `rng`")
    if len(outputs[4]) < 6:
        return Verdict(False, "not yet: only some of the 4-cycles ever appear: draw j uniformly among 0..i-1")
    return Verdict(True, "right: a uniformly random n-cycle in one pass, never a fixed point")


_QUESTION_CASES = [
    ("Tea is easy. Do you like it strong?", True, None),
    ("Would you like a recipe?\n", True, "trailing spaces or a line break after the question mark still end with a question"),
    ('You could ask: "Shall we start?"', True, "a closing quote or bracket after the question mark still ends the reply with a question"),
    ("(Any other questions?)", True, "a closing quote or bracket after the question mark still ends the reply with a question"),
    ("Is tea easy? Yes, it is.", False, "a question in the middle does not count: only how the reply ends"),
    ("Here is the plan.", False, "a reply that ends with a full stop is not a question"),
    ("", False, "an empty reply never satisfies a preference"),
    ("   \n", False, "a reply of only spaces is empty: it never satisfies a preference"),
]


def check_ends_with_question(fn: Callable[[str], Any]) -> Verdict:
    """Check ``fn(text) -> bool``: does the reply end with a question (ignoring trailing spaces, closing quotes and
    brackets)? Tried on a plain question and on the edge cases a checker gets wrong."""
    for text, want, hint in _QUESTION_CASES:
        out, verdict = _run(fn, text)
        if verdict:
            return verdict
        if not isinstance(out, (bool, np.bool_)):
            return Verdict(False, f"return True or False; got {type(out).__name__}")
        if bool(out) != want:
            return Verdict(False, f"not yet: {hint}" if hint else "not yet: a reply that plainly ends with '?' must pass")
    return Verdict(True, "right: plain questions pass; trailing spaces, quotes and brackets handled; empty replies fail")


# ---------------------------------------------------------------- notebook 03: beta's scale, what TRL logs
def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def check_dpo_pair(fn: Callable[[float, float], Any]) -> Verdict:
    """Check ``fn(d, beta) -> (reward_margin, loss)`` for one pair whose log-ratio difference is ``d`` nats:
    ``margin = beta d`` and ``loss = -log sigmoid(beta d)``."""
    for beta in (0.1, 0.5):
        for d in (-3.0, 0.0, 2.0, 10.0):
            out, verdict = _run(fn, d, beta)
            if verdict:
                return verdict
            got, verdict = _two_numbers(out, "the reward margin and the loss")
            if verdict:
                return verdict
            want = np.array([beta * d, _softplus(-beta * d)])
            if _close(got, want):
                continue
            if not _close(got[:1], want[:1]):
                return _first_mistake(got[:1], [
                    ([d], "the reward margin is scaled by beta: r+ - r- = beta x (log-ratio difference)"),
                    ([-beta * d], "the sign: the margin is the chosen reward minus the rejected one"),
                ]) or Verdict(False, "not yet: the reward margin is beta times the log-ratio difference")
            return _first_mistake(got[1:], [
                ([_softplus(-d)], "the loss sees the margin, beta x d, not the raw log-ratio difference"),
                ([-_softplus(-beta * d)], "the sign: the loss is -log sigmoid(margin), a positive number"),
                ([1 / (1 + np.exp(beta * d))], "take the log: the loss is -log sigmoid(margin), not sigmoid(-margin)"),
                ([_softplus(beta * d)], "the loss is -log sigmoid(+margin): a larger margin must lower it"),
            ]) or Verdict(False, "not yet: the loss differs from -log sigmoid(margin)")
    return Verdict(True, "right: the margin scales with beta, and a larger margin gives a lower loss")


_REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _reward_batch() -> tuple[torch.Tensor, ...]:
    """Policy and reference log-probs of 8 pairs: 3 with policy = reference (ties, as at step 0), 2 where the policy's
    raw log-probs and its rewards disagree on which reply is ahead."""
    pc = torch.tensor([-20.0, -31.0, -12.0, -40.0, -15.0, -22.0, -30.0, -9.0], dtype=torch.float64)
    pr = torch.tensor([-25.0, -30.0, -18.0, -35.0, -14.0, -24.0, -28.0, -11.0], dtype=torch.float64)
    rc = torch.tensor([-22.0, -33.0, -12.0, -44.0, -15.0, -22.0, -31.0, -10.0], dtype=torch.float64)
    rr = torch.tensor([-24.0, -29.0, -18.0, -37.0, -14.0, -25.0, -27.0, -11.0], dtype=torch.float64)
    return pc, pr, rc, rr


def check_logged_rewards(fn: Callable[..., Any]) -> Verdict:
    """Check ``fn(pc, pr, rc, rr, beta) -> dict`` with TRL's four batch means ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins`` and ``rewards/accuracies`` (the share of pairs whose chosen reward is strictly larger)."""
    pc, pr, rc, rr = _reward_batch()
    beta = 0.1
    out, verdict = _run(fn, pc.clone(), pr.clone(), rc.clone(), rr.clone(), beta)
    if verdict:
        return verdict
    if not isinstance(out, dict) or any(k not in out for k in _REWARD_KEYS):
        return Verdict(False, "return a dict with the keys " + ", ".join(repr(k) for k in _REWARD_KEYS))
    try:
        got = {k: float(_as_array(out[k]).ravel().mean()) for k in _REWARD_KEYS}
    except (TypeError, ValueError):
        return Verdict(False, "each value should be one number (the mean over the batch)")
    r_c, r_r = beta * (pc - rc), beta * (pr - rr)
    want = {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
            "rewards/margins": (r_c - r_r).mean().item(), "rewards/accuracies": (r_c > r_r).double().mean().item()}
    for key in _REWARD_KEYS[:3]:
        if math.isclose(got[key], want[key], abs_tol=1e-9):
            continue
        side = {"rewards/chosen": (pc, rc), "rewards/rejected": (pr, rr)}.get(key)
        hints = []
        if side is not None:
            hints += [([(side[0] - side[1]).mean().item()], "a reward is scaled by beta: beta (log pi_theta - log pi_ref)"),
                      ([beta * side[0].mean().item()], "a reward is relative to the reference: subtract log pi_ref")]
        else:
            hints += [([-want[key]], "the margin is chosen reward minus rejected reward"),
                      ([want[key] / beta], "the margin is between the rewards, which are scaled by beta")]
        return _first_mistake(np.array([got[key]]), hints) or Verdict(False, f"not yet: {key} differs from the batch mean")
    if not math.isclose(got["rewards/accuracies"], want["rewards/accuracies"], abs_tol=1e-9):
        return _first_mistake(np.array([got["rewards/accuracies"]]), [
            ([(r_c >= r_r).double().mean().item()], "a tie (both rewards 0, as at step 0) is not a correct pair: "
                                                    "count r+ > r-, strictly"),
            ([(pc > pr).double().mean().item()], "compare the rewards (relative to the reference), not the raw "
                                                 "policy log-probs"),
            ([(r_c > r_r).double().sum().item()], "the accuracy is a share of the batch, not a count"),
        ]) or Verdict(False, "not yet: the reward accuracy is the share of pairs with r+ > r-")
    return Verdict(True, "right: rewards scaled by beta and relative to the reference; ties are not counted as correct")


# ------------------------------------------------------------- notebook 03: one LoRA-DPO step, against TRL's step
#: (chosen, rejected) replies of the check's four pairs; the prompts are the personalization task's first four.
_STEP_REPLIES = (
    ("- Water it when the top soil is dry.\n- Give it bright, indirect light.", "Water it and give it some light."),
    ("hey there! boil the water, add the tea and wait three minutes.", "Boil water. Add tea. Wait."),
    ("Two eggs, toast and fruit. Cheers!", "Eggs and toast are a quick breakfast."),
    ("Walk for 20 minutes after lunch, 3 times a week.", "Walking after lunch helps."),
)
_STEP_SIDES = ("chosen", "rejected")


class _RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps a copy of every parameter's gradient as it is when `step` is called: what the step
    applies, whatever the student's code does to the gradients afterwards (`zero_grad`)."""

    def __init__(self, named: Sequence[tuple[str, torch.nn.Parameter]], lr: float) -> None:
        super().__init__([p for _, p in named], lr=lr)
        self.names = [n for n, _ in named]
        self.grads_at_step: dict[str, torch.Tensor | None] | None = None

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        params = self.param_groups[0]["params"]
        self.grads_at_step = {n: None if p.grad is None else p.grad.detach().clone() for n, p in zip(self.names, params)}
        return super().step(closure)


def _right_padded(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, reply ids) rows as one right-padded batch: input ids, attention mask, and a mask of reply tokens."""
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention, reply = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (prompt, completion) in enumerate(rows):
        end = len(prompt) + len(completion)
        ids[i, :end] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        attention[i, :end] = 1
        reply[i, len(prompt):end] = 1
    return {"input_ids": ids, "attention_mask": attention, "reply_mask": reply}


def _step_setup() -> tuple[Any, Any, Any, list[dict[str, Any]], dict[str, torch.Tensor]]:
    """The smoke preset (fp32, LoRA dropout 0: a step is deterministic), its tiny model on the CPU with a LoRA adapter
    whose B matrices are random (so the policy is not the reference and every LoRA matrix gets a gradient), four pairs
    with the base model's log-probs as reference log-probs and the token digests TRL's trainer checks, and the same
    pairs as the student's batch of tensors (on the CPU too, so a GPU machine changes nothing)."""
    from peft import get_peft_model

    from mipo_lib import models, scoring
    from mipo_lib.config import get_preset
    from mipo_lib.tasks import get_task

    preset = get_preset("smoke")
    base, tokenizer = models.load_for_preset(preset, device="cpu")
    policy = get_peft_model(base, models.lora_config(preset))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    policy.eval()
    task = get_task("personalization")
    prompts = [task.prompt(ex) for ex in task.examples("train", len(_STEP_REPLIES), seed=0)]
    replies = {side: [pair[k] for pair in _STEP_REPLIES] for k, side in enumerate(_STEP_SIDES)}
    tokens = {side: [scoring.pair_tokens(tokenizer, p, r, preset.max_length) for p, r in zip(prompts, replies[side])]
              for side in _STEP_SIDES}
    with policy.disable_adapter():
        ref = {side: scoring.sequence_logprobs(policy, tokenizer, prompts, replies[side], max_length=preset.max_length)[0]
               for side in _STEP_SIDES}
    pairs = [{"pair_id": f"step-{i}", "prompt": prompts[i],
              **{side: replies[side][i] for side in _STEP_SIDES},
              **{f"ref_{side}_logps": float(ref[side][i]) for side in _STEP_SIDES},
              **{f"{side}_tokens": len(tokens[side][i][1]) for side in _STEP_SIDES},
              **{f"{side}_token_digest": scoring.token_digest(*tokens[side][i]) for side in _STEP_SIDES}}
             for i in range(len(prompts))]
    batch = {f"{side}_{key}": value for side in _STEP_SIDES
             for key, value in _right_padded(tokens[side], tokenizer.pad_token_id).items()}
    batch.update({f"ref_{side}_logps": torch.tensor(ref[side], dtype=torch.float32) for side in _STEP_SIDES})
    return preset, policy, tokenizer, pairs, batch


def _step_losses(policy: Any, batch: dict[str, torch.Tensor], beta: float) -> dict[str, float]:
    """The DPO loss of `batch` written right, and written with each usual mistake (for the hints)."""
    logps: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for side in _STEP_SIDES:
            ids, reply = batch[f"{side}_input_ids"], batch[f"{side}_reply_mask"]
            logits = policy(input_ids=ids, attention_mask=batch[f"{side}_attention_mask"]).logits.float()
            shifted = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            unshifted = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
            logps[side] = {"right": (shifted * reply[:, 1:]).sum(-1),
                           "mean": (shifted * reply[:, 1:]).sum(-1) / reply[:, 1:].sum(-1),
                           "unshifted": (unshifted * reply).sum(-1)}
    ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]

    def loss(kind: str = "right", scale: float = beta, ref: bool = True, sign: float = 1.0, reduce: str = "mean") -> float:
        c, r = logps["chosen"][kind], logps["rejected"][kind]
        margin = scale * ((c - ref_c) - (r - ref_r)) if ref else scale * (c - r)
        values = -torch.nn.functional.logsigmoid(sign * margin)
        return float(values.sum() if reduce == "sum" else values.mean())

    return {
        "right": loss(),
        "the log-probs are means over the reply's tokens: DPO sums them": loss("mean"),
        "logits at position t predict token t+1: shift them against the token ids": loss("unshifted"),
        "the margin is scaled by beta: beta x (log-ratio of chosen - log-ratio of rejected)": loss(scale=1.0),
        "the rewards are relative to the reference: subtract the reference log-probs": loss(ref=False),
        "the sign: the loss is -log sigmoid(+margin), a larger margin must lower it": loss(sign=-1.0),
        "the loss is the mean over the batch's pairs, not their sum": loss(reduce="sum"),
    }


def _step_gradient_verdict(got: dict[str, torch.Tensor | None], want: dict[str, torch.Tensor]) -> Verdict | None:
    """None when the gradients the student's step applied equal TRL's (relative to the largest entry, 1e-3)."""
    if all(g is None for g in got.values()):
        return Verdict(False, "not yet: the LoRA weights had no gradient at `optimizer.step()`: call `loss.backward()` "
                              "before the step")
    scale = max(g.abs().max().item() for g in want.values())
    worst = max((torch.zeros_like(want[n]) if got.get(n) is None else got[n] - want[n]).abs().max().item() for n in want)
    if worst <= 1e-3 * scale:
        return None
    if any(g is not None and g.abs().max().item() > 0 for g in got.values()) and \
            all(got.get(n) is not None and torch.allclose(got[n], 2 * want[n], rtol=1e-3, atol=1e-3 * scale) for n in want):
        return Verdict(False, "not yet: the loss is right but the gradients are twice TRL's: `loss.backward()` ran twice "
                              "(or old gradients were not cleared: `optimizer.zero_grad()` before `backward`)")
    return Verdict(False, "not yet: the loss matches TRL's but its gradient does not: is a term detached "
                          "(`.detach()`, `.item()`, `torch.no_grad()`), or were old gradients kept?")


def check_lora_dpo_step(fn: Callable[[Any, dict[str, torch.Tensor], float, Any], Any]) -> Verdict:
    """Check ``fn(model, batch, beta, optimizer) -> loss``: one LoRA-DPO training step, by hand.

    `batch` holds four pairs as right-padded tensors (``chosen_input_ids``, ``chosen_attention_mask``,
    ``chosen_reply_mask``, the same three for ``rejected``, and the reference log-probs ``ref_chosen_logps``,
    ``ref_rejected_logps``); `model` is the smoke preset's tiny model with a LoRA adapter, in eval mode. The step
    must compute the summed reply log-probs of chosen and rejected, the sigmoid DPO loss with `beta`, backpropagate
    and call ``optimizer.step()``, and return the loss. The loss and the gradients the step applied are compared with
    TRL's `DPOTrainer` on the same pairs, the same adapter and the same reference log-probs (`dpo.trl_loss_gradients`).
    """
    from mipo_lib import dpo

    preset, policy, tokenizer, pairs, batch = _step_setup()
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    start = {n: p.detach().clone() for n, p in named}
    optimizer = _RecordingSGD(named, lr=1e-2)
    out, verdict = _run(fn, policy, {k: v.clone() for k, v in batch.items()}, preset.beta, optimizer, forbid=_DPO_STEP)
    if verdict:
        return verdict
    try:
        loss = float(out.detach() if isinstance(out, torch.Tensor) else out)
    except (TypeError, ValueError, RuntimeError):
        return Verdict(False, "return the loss: a number or a one-element tensor")
    with torch.no_grad():  # back to the starting point, where TRL computes its loss and gradient
        for n, p in named:
            p.copy_(start[n])
    policy.zero_grad(set_to_none=True)
    policy.eval()
    with tempfile.TemporaryDirectory() as tmp:
        trl_loss, trl_grads = dpo.trl_loss_gradients(policy, tokenizer, pairs, preset, Path(tmp))
    if not math.isclose(loss, trl_loss, rel_tol=1e-4, abs_tol=1e-4):
        mistakes = [([v], hint) for hint, v in _step_losses(policy, batch, preset.beta).items() if hint != "right"]
        return _first_mistake(np.array([loss]), mistakes, tol=1e-4) or Verdict(
            False, "not yet: the loss differs from TRL's: summed reply log-probs (logits shifted by one), rewards "
                   "beta x (policy - reference), loss -log sigmoid(chosen reward - rejected reward), batch mean")
    if optimizer.grads_at_step is None:
        return Verdict(False, "not yet: the loss is right, but no step was taken: `loss.backward()`, then `optimizer.step()`")
    return _step_gradient_verdict(optimizer.grads_at_step, trl_grads) or Verdict(
        True, "right: your step's loss and the LoRA gradients it applied equal TRL's DPOTrainer's on the same pairs")


# ------------------------------------------------------------- notebook 06: a Monte-Carlo KL, a matched K
def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits - np.logaddexp.reduce(logits)


def check_kl_estimates(fn: Callable[[np.ndarray, np.ndarray, int, np.random.Generator], Any]) -> Verdict:
    """Check ``fn(logits_p, logits_q, n, rng) -> n single-sample estimates`` of KL(p || q): ``log p(y) - log q(y)``
    with ``y ~ p`` drawn from `rng` (p and q are the softmax of the logits)."""
    logits_p, logits_q, n = np.array([2.0, 1, 0, 0, -1]), np.array([1.0, 1, 1, 0, 0]), 20_000
    lp, lq = _log_softmax(logits_p), _log_softmax(logits_q)
    exact = float(np.sum(np.exp(lp) * (lp - lq)))
    out, verdict = _run(fn, logits_p.copy(), logits_q.copy(), n, np.random.default_rng(0), forbid=_SCORING)
    if verdict:
        return verdict
    got = _as_array(out)
    if got.ndim == 0 or got.size == 1:
        return Verdict(False, f"return the {n} single-sample estimates (an array), not their mean")
    if got.shape != (n,):
        return Verdict(False, f"expected {n} estimates, shape ({n},); got shape {got.shape}")
    values = lp - lq
    if not np.all(np.min(np.abs(got[:, None] - values[None, :]), axis=1) < 1e-9):
        for candidate, hint in [(logits_p - logits_q, "normalise first: log p = log_softmax(logits_p), not the raw logits"),
                                (lq - lp, "the sign: each estimate is log p(y) - log q(y)")]:
            if np.all(np.min(np.abs(got[:, None] - candidate[None, :]), axis=1) < 1e-9):
                return Verdict(False, f"not yet: {hint}")
        return Verdict(False, "not yet: each estimate should be log p(y) - log q(y) for one sampled token y")
    se = float(np.std(values[np.random.default_rng(1).choice(5, 4000, p=np.exp(lp))])) / math.sqrt(n)
    if abs(got.mean() - exact) > 6 * se:
        reverse = float(np.sum(np.exp(lq) * (lp - lq)))
        if abs(got.mean() - reverse) <= 6 * se:
            return Verdict(False, "not yet: draw y from p (the first distribution), not from q")
        return Verdict(False, "not yet: the estimates do not average to KL(p || q): draw y from p's probabilities")
    again, _ = _run(fn, logits_p.copy(), logits_q.copy(), n, np.random.default_rng(0), forbid=_SCORING)
    other, _ = _run(fn, logits_p.copy(), logits_q.copy(), n, np.random.default_rng(1), forbid=_SCORING)
    if again is None or other is None or not np.array_equal(_as_array(again), got) or np.array_equal(_as_array(other), got):
        return Verdict(False, "not yet: draw the samples from the `rng` argument (same seed, same draws)")
    return Verdict(True, "right: unbiased single-sample estimates, drawn from p with the given rng")


def _optimizer_steps(preset: Any) -> int:
    pairs = preset.k_negatives * preset.n_train_prompts
    return math.ceil(pairs / (preset.batch_size * preset.grad_accum)) * preset.epochs


def check_compute_matched(fn: Callable[[Any, int], Any]) -> Verdict:
    """Check ``fn(preset, k) -> preset``: a variant with ``k`` negatives per prompt that trains on as many pairs, with
    the same schedule (epochs, batch), as ``preset`` with one negative, so it takes the same optimizer steps."""
    from mipo_lib.config import get_preset

    for name in ("cpu", "smoke"):
        base = get_preset(name)
        for k in (2, 4):
            out, verdict = _run(fn, base, k)
            if verdict:
                return verdict
            if not all(hasattr(out, f) for f in ("k_negatives", "n_train_prompts", "epochs", "batch_size")):
                return Verdict(False, "return a preset (`preset.with_overrides(...)`)")
            if out.k_negatives != k:
                return Verdict(False, f"not yet: the variant should have k_negatives = {k}")
            if (out.epochs, out.batch_size, out.grad_accum) != (base.epochs, base.batch_size, base.grad_accum):
                return Verdict(False, "not yet: keep the schedule (epochs, batch size, accumulation): a matched "
                                      "variant changes what it trains on, not how")
            if out.n_train_prompts == base.n_train_prompts:
                return Verdict(False, f"not yet: with all {base.n_train_prompts} prompts, K = {k} trains on {k}x the "
                                      "pairs and steps: use fewer training prompts")
            if out.k_negatives * out.n_train_prompts != base.n_train_prompts or _optimizer_steps(out) != _optimizer_steps(base):
                return Verdict(False, "not yet: the variant's pairs (K x prompts) should equal the reference's "
                                      "(1 x prompts), and so its optimizer steps")
    return Verdict(True, "right: K negatives on 1/K of the prompts, the same pairs and optimizer steps as K = 1")


# ------------------------------------------------------------- notebook 07: the difficulty level, shuffles
def _difficulty_tables() -> list[tuple[pd.DataFrame, tuple[float, float]]]:
    easy_to_hard = pd.DataFrame({"level": ["a", "b", "c", "d", "e"], "accuracy": [0.9, 0.7, 0.45, 0.2, 0.1],
                                 "lo": [0.8, 0.55, 0.3, 0.1, 0.03], "hi": [0.97, 0.82, 0.6, 0.32, 0.2]})
    shuffled = easy_to_hard.sample(frac=1.0, random_state=3).reset_index(drop=True)
    edge = easy_to_hard.assign(accuracy=[0.9, 0.7, 0.45, 0.2, 0.15])  # 0.2 on the lower bound: inside the range
    return [(easy_to_hard, (0.3, 0.8)), (shuffled, (0.3, 0.8)), (edge, (0.2, 0.8)), (shuffled, (0.05, 0.5))]


def check_choose_level(fn: Callable[[pd.DataFrame, float, float], Any]) -> Verdict:
    """Check ``fn(table, low, high) -> level``: the hardest level (lowest validation accuracy) whose accuracy lies in
    [low, high], ends included; the table's rows come in any order."""
    from mipo_lib.experiments import reasoning

    for table, (low, high) in _difficulty_tables():
        out, verdict = _run(fn, table.copy(), low, high, forbid=_CHOOSE_LEVEL)
        if verdict:
            return verdict
        want = reasoning.choose_level(table, (low, high))
        if str(out) == want:
            continue
        inside = table[table["accuracy"].between(low, high)]
        strict = table[(table["accuracy"] > low) & (table["accuracy"] < high)]
        if str(out) == str(inside.sort_values("accuracy").iloc[-1]["level"]):
            return Verdict(False, "not yet: that is the easiest level in range: the hardest (lowest accuracy) leaves "
                                  "the most room to improve")
        if str(out) == str(table.sort_values("accuracy").iloc[0]["level"]):
            return Verdict(False, "not yet: that level's accuracy is outside the range: keep only levels inside it")
        if not strict.empty and str(out) == str(strict.sort_values("accuracy").iloc[0]["level"]):
            return Verdict(False, "not yet: the range includes its ends (low <= accuracy <= high)")
        if str(out) == str(inside.iloc[0]["level"]):
            return Verdict(False, "not yet: the rows come in any order: sort by accuracy, do not take the first row")
        return Verdict(False, "not yet: pick the level with the lowest accuracy among those inside [low, high]")
    return Verdict(True, "right: the hardest level whose validation accuracy is in the informative range")


def check_identical_pairs(fn: Callable[[Sequence[str], np.ndarray], Any]) -> Verdict:
    """Check ``fn(positives, perm) -> int``: how many pairs (positives[i], positives[perm[i]]) have the same text,
    fixed points of the shuffle and different problems whose answers coincide alike."""
    positives = ["#### 7", "3 + 4 = 7. #### 7", "#### 12", "#### 7", "#### 5", "#### 12", "#### 9", "#### 7"]
    perms = [np.array([3, 1, 5, 0, 4, 2, 7, 6]), np.array([1, 2, 3, 4, 5, 6, 7, 0]), np.arange(8)[::-1].copy()]
    for perm in perms:
        out, verdict = _run(fn, list(positives), perm.copy())
        if verdict:
            return verdict
        try:
            got = int(out)
        except (TypeError, ValueError):
            return Verdict(False, "return one integer: the number of pairs whose two texts are equal")
        want = sum(positives[i] == positives[perm[i]] for i in range(len(perm)))
        if got == want:
            continue
        if got == int(np.sum(perm == np.arange(len(perm)))):
            return Verdict(False, "not yet: that counts the fixed points only: two different problems can have the "
                                  "same answer text, and such a pair is just as useless")
        if got == len(perm) - want:
            return Verdict(False, "not yet: that counts the pairs whose texts differ")
        return Verdict(False, "not yet: compare the texts positives[i] and positives[perm[i]] for every i")
    return Verdict(True, "right: every pair with chosen == rejected counted, fixed points and coincidences alike")


# ------------------------------------------------------------- notebook 04: CAD by hand, a judge with the token cap
def _log_softmax_list(logits: Sequence[float]) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    return z - np.logaddexp.reduce(z)


_CAD_CASES: tuple[tuple[tuple[float, ...], tuple[float, ...], float], ...] = (
    ((2.0, 1.0, 0.0), (3.0, 0.0, 0.0), 10.0),          # the exercise's vocabulary {A, B, C} at beta = 0.1
    ((0.5, -1.0, 2.0, 0.3), (1.0, 1.0, -2.0, 0.0), 2.0),
    ((1.0, 2.0, 3.0), (1.0, 2.0, 3.0), 0.5),           # the context changes nothing: CAD gives back log p(.|x,c)
)


def check_cad_scores(fn: Callable[[list[float], list[float], float], Any]) -> Verdict:
    """Check ``fn(cond_logits, uncond_logits, a) -> one score per token``: context-aware decoding's
    ``(1 + a) log p(y|x, c) - a log p(y|x)``, the log-probabilities being the log-softmax of the logits."""
    for cond, uncond, a in _CAD_CASES:
        out, verdict = _run(fn, list(cond), list(uncond), a, forbid=_CAD)
        if verdict:
            return verdict
        got = _as_array(out).ravel()
        if got.shape != (len(cond),):
            return Verdict(False, f"return one score per token of the vocabulary ({len(cond)} numbers); got shape {got.shape}")
        lc, lu = _log_softmax_list(cond), _log_softmax_list(uncond)
        want = (1 + a) * lc - a * lu
        if _close(got, want, 1e-4):
            continue
        pc, pu = np.exp(lc), np.exp(lu)
        mistake = _first_mistake(got, [
            ((1 + a) * np.asarray(cond) - a * np.asarray(uncond),
             "those are raw logits: take the log-softmax of each set of logits first (CAD mixes log-probabilities)"),
            ((1 + a) * pc - a * pu, "those are probabilities: CAD mixes log-probabilities (take their log)"),
            ((1 + a) * lu - a * lc, "the sign: the prompt *with* the preference gets the weight 1 + a, the context-free "
                                    "one is subtracted with the weight a"),
            (a * lc - (1 + a) * lu, "the weights are swapped: 1 + a goes with log p(y|x, c), a with log p(y|x)"),
            (lc - a * lu, "the weight of log p(y|x, c) is 1 + a, not 1"),
            (a * (lc - lu), "that is a x the PMI alone: CAD keeps the model's own log-probability too, "
                            "(1 + a) log p(y|x, c) - a log p(y|x) = log p(y|x, c) + a x PMI"),
        ], 1e-4)
        return mistake or Verdict(False, "not yet: the scores differ from (1 + a) log p(y|x, c) - a log p(y|x)")
    return Verdict(True, "right: log-softmax of both, the context-ful one weighted 1 + a, the context-free one subtracted")


_SENTENCE_CASES: tuple[tuple[str, bool, bool, str | None], ...] = (
    ("Boil the water. Add the tea bag. Wait three minutes!", False, True, None),
    ("Boil the water. Add the tea bag. Wait three minutes!", True, False,
     "a reply cut off at the token cap could have gone on with a long sentence: the judge cannot know, so a "
     "truncated reply fails (this preference belongs in COMPLETE_ONLY)"),
    ("Boil the water. Then put one tea bag into your favourite mug and pour the hot water slowly over it. Enjoy!",
     False, False, "every sentence must be short, also the ones in the middle"),
    ("Boil the water. Then put one tea bag into your favourite mug and pour the hot water slowly over it.",
     False, False, "every sentence must be short, also the last one"),
    ("Put one tea bag into your favourite mug and pour the hot water slowly over it. Enjoy!",
     False, False, "every sentence must be short, also the first one"),
    ("Put one tea bag in a mug and pour hot water in. Enjoy!", False, False,
     "under 12 words means at most 11: a sentence of exactly 12 words is too long"),
    ("Put one tea bag in a mug and pour hot water. Enjoy!", False, True,
     "a sentence of 11 words is under 12: count the words with text.split()"),
    ("Boil the water in a kettle\nPut the tea bag in a mug\nWait three minutes then enjoy", False, True,
     "a line break ends a sentence too (a bullet line is a sentence of its own): split with "
     "mipo_lib.tasks.personalization.sentences"),
    ("", False, False, "an empty reply never satisfies a preference"),
    ("  \n ", False, False, "a reply of only spaces is empty: it never satisfies a preference"),
)


def check_short_sentences(fn: Callable[[str, bool], Any]) -> Verdict:
    """Check ``fn(text, truncated) -> bool``, the judge of *"Keep every sentence under 12 words."*: a non-empty reply
    whose every sentence (``personalization.sentences``: ends at . ! ? and at line breaks) has fewer than 12 words,
    and that was not cut off at the token cap (more text could have added a long sentence)."""
    for text, truncated, want, hint in _SENTENCE_CASES:
        out, verdict = _run(fn, text, truncated)
        if verdict:
            return verdict
        if not isinstance(out, (bool, np.bool_)):
            return Verdict(False, f"return True or False; got {type(out).__name__}")
        if bool(out) != want:
            return Verdict(False, f"not yet: {hint}" if hint else "not yet: a finished reply of short sentences must pass")
    return Verdict(True, "right: every sentence under 12 words, line breaks split sentences, empty and cut-off replies fail")


# ------------------------------------------------------------- notebook 05: a bootstrap CI, why pairing helps
def _skewed_samples() -> list[np.ndarray]:
    """Two small right-skewed samples: a percentile-bootstrap CI of their mean is visibly asymmetric, so it differs
    from the normal approximation and from a 90% interval by more than the Monte-Carlo noise of the check."""
    rng = np.random.default_rng(7)
    return [np.round(rng.lognormal(0.0, 1.4, size=40), 3), np.round(rng.lognormal(0.5, 1.0, size=60), 3)]


def _percentile_bootstrap(x: np.ndarray, n_boot: int, seed: int, q: tuple[float, float] = (0.025, 0.975)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = np.concatenate([x[rng.integers(0, x.size, size=(min(20_000, n_boot - done), x.size))].mean(axis=1)
                            for done in range(0, n_boot, 20_000)])
    return np.quantile(means, q)


def check_bootstrap_ci(fn: Callable[[np.ndarray, int, np.random.Generator], Any]) -> Verdict:
    """Check ``fn(x, n_boot, rng) -> (lo, hi)``: the 95% percentile-bootstrap CI of the mean of `x`, from `n_boot`
    resamples of `x` with replacement drawn with `rng` (the 2.5th and 97.5th percentiles of the resampled means)."""
    n_boot = 20_000
    for x in _skewed_samples():
        out, verdict = _run(fn, x.copy(), n_boot, np.random.default_rng(0), forbid=_STATS)
        if verdict:
            return verdict
        parts, verdict = _parts(out, 2, "the lower and the upper end of the interval")
        if verdict:
            return verdict
        try:
            got = np.array([float(_as_array(p).ravel()[0]) for p in parts])
        except (IndexError, TypeError, ValueError):
            return Verdict(False, "return two numbers: the lower and the upper end of the interval")
        want = _percentile_bootstrap(x, 200_000, 123)
        tol = 0.03 * float(want[1] - want[0])  # Monte-Carlo noise of 20,000 resamples is well below this
        if _close(got, want, tol):
            continue
        mean, se0, se1 = float(x.mean()), float(x.std() / math.sqrt(x.size)), float(x.std(ddof=1) / math.sqrt(x.size))
        return _first_mistake(got, [
            (want[::-1], "return (lo, hi), the lower end first"),
            ([mean - 1.96 * se1, mean + 1.96 * se1], "that is the normal approximation: resample and read the percentiles"),
            ([mean - 1.96 * se0, mean + 1.96 * se0], "that is the normal approximation: resample and read the percentiles"),
            ([mean, mean], "every resample has the same mean: draw the resamples *with* replacement"),
            (np.quantile(x, [0.025, 0.975]), "those are percentiles of the data: take the percentiles of the resamples' means"),
            (_percentile_bootstrap(x, 200_000, 123, (0.05, 0.95)), "that is a 90% interval: a 95% interval leaves 2.5% "
                                                                   "out on each side (percentiles 2.5 and 97.5)"),
        ], tol) or Verdict(False, "not yet: the interval differs from the 2.5th and 97.5th percentiles of the resampled means")
    x = _skewed_samples()[0]
    again, _ = _run(fn, x.copy(), n_boot, np.random.default_rng(0), forbid=_STATS)
    other, _ = _run(fn, x.copy(), n_boot, np.random.default_rng(1), forbid=_STATS)
    first, _ = _run(fn, x.copy(), n_boot, np.random.default_rng(0), forbid=_STATS)
    if again is None or other is None or not np.allclose(_as_array(list(again)), _as_array(list(first))) or \
            np.allclose(_as_array(list(other)), _as_array(list(first)), rtol=0, atol=0):
        return Verdict(False, "not yet: draw the resamples from the `rng` argument (same seed, same interval)")
    return Verdict(True, "right: the percentile bootstrap, resampling with replacement from the given rng")


def _paired_world() -> tuple[np.ndarray, np.ndarray]:
    """0/1 scores [seeds x prompts] of two methods that share the prompts' difficulty (hard prompts are hard for
    both): the situation where pairing narrows the CI of a difference."""
    rng = np.random.default_rng(5)
    difficulty = rng.random(60)
    a = (rng.random((3, 60)) < np.clip(difficulty + 0.15, 0, 1)).astype(float)
    b = (rng.random((3, 60)) < difficulty).astype(float)
    return a, b


def _pairing_reference(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Resampled mean differences, paired (one prompt draw for both) and unpaired (independent draws)."""
    rng = np.random.default_rng(seed)
    n_ex = a.shape[1]
    paired, unpaired = [], []
    for done in range(0, n_boot, 10_000):
        k = min(10_000, n_boot - done)
        ia, ib = rng.integers(0, n_ex, size=(k, n_ex)), rng.integers(0, n_ex, size=(k, n_ex))
        mean_a = a[:, ia].mean(axis=(0, 2))
        paired.append(mean_a - b[:, ia].mean(axis=(0, 2)))
        unpaired.append(mean_a - b[:, ib].mean(axis=(0, 2)))
    return np.concatenate(paired), np.concatenate(unpaired)


def _width(v: np.ndarray) -> float:
    lo, hi = np.quantile(v, [0.025, 0.975])
    return float(hi - lo)


def check_pairing_widths(fn: Callable[[np.ndarray, np.ndarray, int, np.random.Generator], Any]) -> Verdict:
    """Check ``fn(A, B, n_boot, rng) -> (paired_width, unpaired_width)``: the widths (hi - lo) of the 95% percentile
    bootstrap CIs of mean(A) - mean(B), where A and B are [seeds x prompts] scores on the same prompts and each
    replicate resamples the prompts with replacement (one draw shared by every seed): paired, the same draw for A and
    B; unpaired, an independent draw for each."""
    a, b = _paired_world()
    n_boot = 10_000
    out, verdict = _run(fn, a.copy(), b.copy(), n_boot, np.random.default_rng(0), forbid=_STATS)
    if verdict:
        return verdict
    parts, verdict = _parts(out, 2, "the paired width and the unpaired width")
    if verdict:
        return verdict
    try:
        got = np.array([float(_as_array(p).ravel()[0]) for p in parts])
    except (IndexError, TypeError, ValueError):
        return Verdict(False, "return two numbers: the paired width and the unpaired width")
    paired, unpaired = _pairing_reference(a, b, 40_000, 123)
    want = np.array([_width(paired), _width(unpaired)])
    tol = 0.1 * float(want[0])
    if _close(got, want, tol):
        return Verdict(True, "right: the same prompt draw for both methods gives the narrower CI (hard prompts are "
                             "hard for both, so their scores covary)")
    sd = np.array([paired.std(), unpaired.std()])
    return _first_mistake(got, [
        (want[::-1], "return (paired, unpaired) in that order"),
        (np.array([want[0], want[0]]), "the unpaired CI draws the prompts independently for each method"),
        (np.array([want[1], want[1]]), "the paired CI uses the same draw of prompts for both methods"),
        (sd, "those look like standard deviations: a width is hi - lo of the 95% percentile interval"),
    ], tol) or Verdict(False, "not yet: the widths differ from the 95% percentile intervals of the resampled "
                              "differences (prompts resampled with replacement, one draw shared by every seed)")


@dataclass(frozen=True)
class Exercise:
    """One graded exercise: the function its stub defines, and the name of the checker (in this module) grading it."""

    function: str
    checker: str

    def check(self, fn: Callable[..., Any]) -> Verdict:
        return globals()[self.checker](fn)


#: notebook -> its exercises, in the notebook's order (tests/test_exercises.py holds every notebook to this list: each
#: exercise has a statement, a stub and a check cell there, and a solution in notebooks/solutions/).
EXERCISES: dict[str, tuple[Exercise, ...]] = {
    "01": (Exercise("world_summary", "check_world_summary"), Exercise("pmi_and_kl", "check_pmi_and_kl"),
           Exercise("log_partition", "check_log_partition"), Exercise("conditional_pmi_table", "check_conditional_pmi")),
    "02": (Exercise("mipo_pairs", "check_mipo_pairs"), Exercise("sattolo", "check_sattolo"),
           Exercise("ends_with_question", "check_ends_with_question")),
    "03": (Exercise("dpo_pair", "check_dpo_pair"), Exercise("logged_rewards", "check_logged_rewards"),
           Exercise("sequence_logprob", "check_sequence_logprob"), Exercise("lora_dpo_step", "check_lora_dpo_step")),
    "04": (Exercise("cad_scores", "check_cad_scores"), Exercise("short_sentences", "check_short_sentences")),
    "05": (Exercise("bootstrap_ci", "check_bootstrap_ci"), Exercise("ci_widths", "check_pairing_widths")),
    "06": (Exercise("kl_estimates", "check_kl_estimates"), Exercise("compute_matched", "check_compute_matched")),
    "07": (Exercise("choose_level", "check_choose_level"), Exercise("identical_pairs", "check_identical_pairs")),
}
