"""Graded exercises: the checkers say right / what is wrong / not done yet; every exercise in the notebooks is a stub,
a hidden solution and a check cell; the student edition drops the solutions and its checks report "not done yet"."""

from __future__ import annotations

import math
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from mipo_lib import exercises, mi
from mipo_lib.exercises import NOT_DONE

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0[0-6]_*.ipynb"))
GRADED = {"01": "check_conditional_pmi", "02": "check_mipo_pairs", "03": "check_sequence_logprob"}


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
    if path.name[:2] in GRADED:
        assert any(f"exercises.{GRADED[path.name[:2]]}(" in check.source for _, check in pairs), f"{path.name}: graded exercise missing"
    for stub, check in pairs:
        assert "raise NotImplementedError" in stub.source and "exercises.check_" in check.source


def test_student_edition_drops_solutions_and_its_checks_say_not_done(tmp_path):
    written = exercises.student_edition(NOTEBOOKS, tmp_path / "student")
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    graded = 0
    for path in written:
        nb = nbformat.read(path, as_version=4)
        assert not any("solution" in _tags(c) for c in nb.cells), f"{path.name}: a solution survived"
        for stub, check in _exercise_cells(nb):
            namespace = {"np": np, "torch": torch, "math": math}
            exec(compile(stub.source, f"{path.name}:stub", "exec"), namespace)
            *body, last = check.source.strip().splitlines()
            exec(compile("\n".join(body), f"{path.name}:check", "exec"), namespace)
            verdict = eval(last, namespace)
            assert verdict.ok is None and verdict.message.startswith(NOT_DONE), f"{path.name}: {verdict}"
            graded += 1
    assert graded >= len(GRADED)
