"""Graded exercises: the checkers say right / what is wrong / not done yet; every exercise in the notebooks is a stub,
a hidden solution and a check cell; the student edition drops the solutions and its checks report "not done yet"."""

from __future__ import annotations

import math
import re
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

from mipo_lib.workbook import exercises
from mipo_lib import mi
from mipo_lib.workbook.exercises import NOT_DONE

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
GRADED = exercises.CHECKERS  # notebook -> its checkers, in order


def _stub(*args):
    raise NotImplementedError


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


# ------------------------------------------------------------------------------------------------- checkers
def _seq_right(logits, ids, mask):
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(-1)


def _seq_unshifted(logits, ids, mask):
    return (torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1) * mask).sum(-1)


def _seq_mean(logits, ids, mask):
    return _seq_right(logits, ids, mask) / mask[:, 1:].sum(-1)


def _pairs(perm_of):
    def build(prompts, positives, rng):
        perm = perm_of(len(prompts), rng)
        return [(prompts[i], positives[i], positives[perm[i]]) for i in range(len(prompts))]

    return build


def _derangement(n, rng):
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def _cpmi_right(pi0_c, pc):
    return np.log(pi0_c) - np.log(np.einsum("xc,xcy->xy", pc, pi0_c))[:, None, :]


@pytest.mark.parametrize(
    "check,fn,ok,hint",
    [
        (exercises.check_sequence_logprob, _seq_right, True, "right"),
        (exercises.check_sequence_logprob, _seq_unshifted, False, "predict token t+1"),
        (exercises.check_sequence_logprob, _seq_mean, False, "mean per token"),
        (exercises.check_mipo_pairs, _pairs(_derangement), True, "right"),
        (exercises.check_mipo_pairs, _pairs(lambda n, rng: rng.permutation(n)), False, "fixed point"),
        (exercises.check_mipo_pairs, _pairs(lambda n, rng: np.roll(np.arange(n), 1)), False, "same pairing"),
        (exercises.check_conditional_pmi, _cpmi_right, True, "right"),
        (exercises.check_conditional_pmi, lambda p, pc: -_cpmi_right(p, pc), False, "sign"),
        (exercises.check_conditional_pmi, lambda p, pc: np.log(p) - np.log(p.mean(1))[:, None, :], False, "p(c'|x)"),
    ],
)
def test_checkers_grade_right_answers_and_name_the_mistake(check, fn, ok, hint):
    verdict = check(fn)
    assert verdict.ok is ok and hint in verdict.message, verdict.message


@pytest.mark.parametrize("check", [exercises.check_sequence_logprob, exercises.check_mipo_pairs, exercises.check_conditional_pmi])
def test_checkers_say_not_done_for_a_stub_and_survive_a_crash(check):
    assert check(_stub).ok is None and check(_stub).message.startswith(NOT_DONE)
    assert check(lambda *a: None).ok is None
    crashed = check(lambda *a: 1 / 0)
    assert crashed.ok is False and "ZeroDivisionError" in crashed.message


# ------------------------------------------------------------------------------ the later exercises' answers
def _world_summary(pi0, px, beta):
    m = px @ pi0
    info = float(np.sum(px[:, None] * pi0 * (np.log(pi0) - np.log(m)[None, :])))
    opt = pi0 ** (1 + 1 / beta) / m[None, :] ** (1 / beta)
    return m, info, opt / opt.sum(axis=1, keepdims=True)


def _pmi_and_kl(pi0, px, beta, under_pi0=False, reverse_kl=False):
    m = px @ pi0
    pmi = np.log(pi0) - np.log(m)[None, :]
    opt = pi0 * np.exp(pmi / beta)
    opt /= opt.sum(axis=1, keepdims=True)
    weights = pi0 if under_pi0 else opt
    kl = np.sum(pi0 * np.log(pi0 / opt), axis=1) if reverse_kl else np.sum(opt * np.log(opt / pi0), axis=1)
    return float(np.sum(px[:, None] * weights * pmi)), float(np.sum(px * kl))


def _log_z(pi0, px, beta, naive=False, unweighted=False):
    pmi = np.log(pi0) - np.log(px @ pi0)[None, :]
    if naive:
        with np.errstate(over="ignore"):
            return np.log(np.sum(pi0 * np.exp(pmi / beta), axis=1))
    return np.logaddexp.reduce((0 if unweighted else np.log(pi0)) + pmi / beta, axis=1)


def _sattolo(n, rng, allow_equal=False):
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = rng.integers(0, i + 1 if allow_equal else i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _ends_with_question(text):
    return text.rstrip().rstrip("\"')»”’").endswith("?")


def _dpo_pair(d, beta):
    margin = beta * d
    return margin, math.log1p(math.exp(-margin))


def _logged(pc, pr, rc, rr, beta, ties=False):
    r_c, r_r = beta * (pc - rc), beta * (pr - rr)
    acc = (r_c >= r_r) if ties else (r_c > r_r)
    return {"rewards/chosen": r_c.mean(), "rewards/rejected": r_r.mean(), "rewards/margins": (r_c - r_r).mean(),
            "rewards/accuracies": acc.double().mean()}


def _kl_estimates(logits_p, logits_q, n, rng, from_q=False, raw=False):
    lp = logits_p - (0 if raw else np.logaddexp.reduce(logits_p))
    lq = logits_q - (0 if raw else np.logaddexp.reduce(logits_q))
    ls = logits_q - np.logaddexp.reduce(logits_q) if from_q else logits_p - np.logaddexp.reduce(logits_p)
    y = rng.choice(len(lp), size=n, p=np.exp(ls))
    return lp[y] - lq[y]


def _matched(preset, k):
    return preset.with_overrides(k_negatives=k, n_train_prompts=preset.n_train_prompts // k)


def _choose(table, low, high):
    inside = table[(table["accuracy"] >= low) & (table["accuracy"] <= high)]
    return inside.sort_values("accuracy").iloc[0]["level"]


def _identical(positives, perm):
    return sum(positives[i] == positives[perm[i]] for i in range(len(perm)))


def _log_softmax_list(v):
    z = math.log(sum(math.exp(t) for t in v))
    return [t - z for t in v]


def _cad(cond, uncond, a, raw=False, pmi_only=False):
    lc, lu = (cond, uncond) if raw else (_log_softmax_list(cond), _log_softmax_list(uncond))
    if pmi_only:
        return [a * (x - y) for x, y in zip(lc, lu)]
    return [(1 + a) * x - a * y for x, y in zip(lc, lu)]


def _short_sentences(text, truncated, limit=12, ignore_cap=False, split=None):
    from mipo_lib.tasks.personalization import sentences

    parts = sentences(text) if split is None else [s for s in re.split(split, text) if s.strip()]
    return (ignore_cap or not truncated) and bool(parts) and all(len(s.split()) < limit for s in parts)


def _bootstrap_ci(x, n_boot, rng, q=(0.025, 0.975), normal=False):
    if normal:
        half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
        return x.mean() - half, x.mean() + half
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, q)
    return lo, hi


def _widths(a, b, n_boot, rng, same_draw=False, independent=False):
    n_ex = a.shape[1]
    ia, ib = rng.integers(0, n_ex, size=(n_boot, n_ex)), rng.integers(0, n_ex, size=(n_boot, n_ex))
    mean = lambda m, idx: m[:, idx].mean(axis=(0, 2))  # noqa: E731
    paired = mean(a, ia) - mean(b, ib if independent else ia)
    unpaired = mean(a, ia) - mean(b, ia if same_draw else ib)
    width = lambda v: float(np.diff(np.quantile(v, [0.025, 0.975]))[0])  # noqa: E731
    return width(paired), width(unpaired)


@pytest.mark.parametrize(
    "check,fn,ok,hint",
    [
        (exercises.check_world_summary, _world_summary, True, "right"),
        (exercises.check_world_summary, lambda p, px, b: (p.mean(0), *_world_summary(p, px, b)[1:]), False, "p(x)"),
        (exercises.check_world_summary, lambda p, px, b: (_world_summary(p, px, b)[0], _world_summary(p, px, b)[1] / math.log(2),
                                                           _world_summary(p, px, b)[2]), False, "bits"),
        (exercises.check_world_summary, lambda p, px, b: (*_world_summary(p, px, b)[:2],
                                                           p ** (1 + 1 / b) / (px @ p)[None, :] ** (1 / b)), False, "normalise"),
        (exercises.check_pmi_and_kl, _pmi_and_kl, True, "right"),
        (exercises.check_pmi_and_kl, lambda p, px, b: _pmi_and_kl(p, px, b, under_pi0=True), False, "under the optimum"),
        (exercises.check_pmi_and_kl, lambda p, px, b: _pmi_and_kl(p, px, b, reverse_kl=True), False, "not symmetric"),
        (exercises.check_log_partition, _log_z, True, "right"),
        (exercises.check_log_partition, lambda p, px, b: _log_z(p, px, b, naive=True), False, "overflow"),
        (exercises.check_log_partition, lambda p, px, b: _log_z(p, px, b, unweighted=True), False, "weigh"),
        (exercises.check_sattolo, _sattolo, True, "right"),
        (exercises.check_sattolo, lambda n, rng: _sattolo(n, rng, allow_equal=True), False, "j < i"),
        (exercises.check_sattolo, lambda n, rng: _derangement(n, rng), False, "several cycles"),
        (exercises.check_ends_with_question, _ends_with_question, True, "right"),
        (exercises.check_ends_with_question, lambda t: t.endswith("?"), False, "trailing spaces"),
        (exercises.check_ends_with_question, lambda t: "?" in t, False, "in the middle"),
        (exercises.check_dpo_pair, _dpo_pair, True, "right"),
        (exercises.check_dpo_pair, lambda d, b: (d, math.log1p(math.exp(-b * d))), False, "scaled by beta"),
        (exercises.check_dpo_pair, lambda d, b: (b * d, 1 / (1 + math.exp(b * d))), False, "take the log"),
        (exercises.check_logged_rewards, _logged, True, "right"),
        (exercises.check_logged_rewards, lambda *a: _logged(*a, ties=True), False, "tie"),
        (exercises.check_logged_rewards, lambda pc, pr, rc, rr, b: _logged(pc, pr, rc, rr, 1.0), False, "scaled by beta"),
        (exercises.check_kl_estimates, _kl_estimates, True, "right"),
        (exercises.check_kl_estimates, lambda *a: _kl_estimates(*a, from_q=True), False, "not from q"),
        (exercises.check_kl_estimates, lambda *a: _kl_estimates(*a, raw=True), False, "normalise"),
        (exercises.check_kl_estimates, lambda *a: float(np.mean(_kl_estimates(*a))), False, "not their mean"),
        (exercises.check_compute_matched, _matched, True, "right"),
        (exercises.check_compute_matched, lambda p, k: p.with_overrides(k_negatives=k), False, "fewer training prompts"),
        (exercises.check_compute_matched, lambda p, k: p.with_overrides(k_negatives=k, epochs=max(1, p.epochs // k)), False,
         "schedule"),
        (exercises.check_choose_level, _choose, True, "right"),
        (exercises.check_choose_level, lambda t, lo, hi: t[t["accuracy"].between(lo, hi)].sort_values("accuracy").iloc[-1]["level"],
         False, "easiest"),
        (exercises.check_choose_level, lambda t, lo, hi: t[(t["accuracy"] > lo) & (t["accuracy"] < hi)].sort_values("accuracy").iloc[0]["level"],
         False, "ends"),
        (exercises.check_identical_pairs, _identical, True, "right"),
        (exercises.check_identical_pairs, lambda pos, perm: int(np.sum(perm == np.arange(len(perm)))), False, "fixed points only"),
        (exercises.check_cad_scores, _cad, True, "right"),
        (exercises.check_cad_scores, lambda c, u, a: _cad(c, u, a, raw=True), False, "raw logits"),
        (exercises.check_cad_scores, lambda c, u, a: _cad(u, c, a), False, "the sign"),
        (exercises.check_cad_scores, lambda c, u, a: _cad(c, u, a, pmi_only=True), False, "PMI alone"),
        (exercises.check_short_sentences, _short_sentences, True, "right"),
        (exercises.check_short_sentences, lambda t, tr: _short_sentences(t, tr, ignore_cap=True), False, "COMPLETE_ONLY"),
        (exercises.check_short_sentences, lambda t, tr: _short_sentences(t, tr, limit=13), False, "exactly 12 words"),
        (exercises.check_short_sentences, lambda t, tr: _short_sentences(t, tr, split=r"[.!?]"), False, "line break"),
        (exercises.check_bootstrap_ci, _bootstrap_ci, True, "right"),
        (exercises.check_bootstrap_ci, lambda x, n, rng: _bootstrap_ci(x, n, rng, normal=True), False, "normal approximation"),
        (exercises.check_bootstrap_ci, lambda x, n, rng: _bootstrap_ci(x, n, rng, q=(0.05, 0.95)), False, "90%"),
        (exercises.check_bootstrap_ci, lambda x, n, rng: _bootstrap_ci(x, n, np.random.default_rng(0)), False, "`rng`"),
        (exercises.check_pairing_widths, _widths, True, "right"),
        (exercises.check_pairing_widths, lambda a, b, n, rng: _widths(a, b, n, rng, same_draw=True), False, "independently"),
        (exercises.check_pairing_widths, lambda a, b, n, rng: _widths(a, b, n, rng, independent=True), False, "same draw"),
        (exercises.check_pairing_widths, lambda a, b, n, rng: _widths(a, b, n, rng)[::-1], False, "in that order"),
    ],
)
def test_later_checkers_grade_right_answers_and_name_the_mistake(check, fn, ok, hint):
    verdict = check(fn)
    assert verdict.ok is ok and hint in verdict.message, verdict.message


@pytest.mark.parametrize("name", sorted({c for names in exercises.CHECKERS.values() for c in names}))
def test_every_checker_says_not_done_for_a_stub_and_survives_a_crash(name):
    check = getattr(exercises, name)
    assert check(_stub).ok is None and check(_stub).message.startswith(NOT_DONE)
    assert check(lambda *a: None).ok is None
    crashed = check(lambda *a: 1 / 0)
    assert crashed.ok is False and "ZeroDivisionError" in crashed.message


def test_hints_do_not_reveal_the_answer():
    """A wrong answer's message must not print the expected numbers."""
    want = mi.conditional_pmi(mi.random_world(6, 5, 0.5, seed=3)[0].reshape(2, 3, 5), np.full((2, 3), 1 / 3))
    message = exercises.check_conditional_pmi(lambda p, pc: np.zeros_like(p)).message
    assert not any(f"{v:.2f}" in message for v in want.ravel())


# ----------------------------------------------------------------------------------------- notebook structure
def _exercise_cells(nb):
    """(stub, check) source pairs: each stub cell with the next cell tagged `check`."""
    out = []
    for i, cell in enumerate(nb.cells):
        if "stub" in _tags(cell):
            check = next(c for c in nb.cells[i + 1:] if "check" in _tags(c))
            out.append((cell, check))
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_solutions_are_hidden_without_outputs_and_stubs_have_checks(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if "solution" in _tags(cell):
            assert cell.metadata.get("cellView") == "form" and cell.metadata["jupyter"]["source_hidden"] is True
            assert cell.source.startswith("# @title") and not cell.outputs, f"{path.name}: solution cell shows itself"
    pairs = _exercise_cells(nb)
    used = [re.search(r"exercises\.(check_\w+)\(", check.source).group(1) for _, check in pairs]
    assert used == list(GRADED.get(path.name[:2], ())), f"{path.name}: exercises {used}, expected {GRADED.get(path.name[:2])}"
    for stub, check in pairs:
        assert "raise NotImplementedError" in stub.source and "exercises.check_" in check.source


# Temporary: these notebooks' owner is converting their exercises; remove the entry once a notebook passes.
UNGRADED_EXERCISES: set[str] = set()


@pytest.mark.parametrize("path", [
    pytest.param(p, id=p.stem, marks=[pytest.mark.xfail(strict=False, reason="owner: notebooks 04/05 exercises not graded yet")]
                 if p.name[:2] in UNGRADED_EXERCISES else []) for p in NOTEBOOKS])
def test_every_exercise_is_graded(path):
    """An exercise is a stub, then its hidden solution, then its check: every solution cell sits between a stub and
    its check, so no exercise is left with a solution and nothing to grade."""
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if "solution" in _tags(cell):
            before = [c for c in nb.cells[:i] if {"stub", "check"} & set(_tags(c))]
            assert before and "stub" in _tags(before[-1]), f"{path.name} cell {i}: a solution without a stub before it"


def test_student_edition_drops_solutions_and_its_checks_say_not_done(tmp_path):
    written = exercises.student_edition(NOTEBOOKS, tmp_path / "student")
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    graded = 0
    for path in written:
        nb = nbformat.read(path, as_version=4)
        assert not any("solution" in _tags(c) for c in nb.cells), f"{path.name}: a solution survived"
        for stub, check in _exercise_cells(nb):
            namespace = {"np": np, "torch": torch, "math": math, "pd": pd}
            exec(compile(stub.source, f"{path.name}:stub", "exec"), namespace)
            *body, last = check.source.strip().splitlines()
            exec(compile("\n".join(body), f"{path.name}:check", "exec"), namespace)
            verdict = eval(last, namespace)
            assert verdict.ok is None and verdict.message.startswith(NOT_DONE), f"{path.name}: {verdict}"
            graded += 1
    assert graded == sum(len(v) for v in GRADED.values())
