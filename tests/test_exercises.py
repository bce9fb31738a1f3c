"""Graded exercises: the checkers say right / what is wrong / not done yet, and refuse a call of the library function an
exercise asks to write, through any alias; the numbered notebooks are the student edition (every exercise a
statement, a stub and a check, placed before the code that would reveal it, every check saying "not done yet"); the
solutions notebooks are what `editions` builds, and every solution passes its checker."""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mipo_lib import mi
from mipo_lib.errors import MipoError
from mipo_lib.workbook import editions, exercises
from mipo_lib.workbook.exercises import EXERCISES, NOT_DONE

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = editions.numbered_notebooks(ROOT / "notebooks")
WITH_EXERCISES = [p for p in NOTEBOOKS if p.name[:2] in EXERCISES]
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
CHECKERS = sorted({e.checker for exs in EXERCISES.values() for e in exs})


def _stub(*args):
    raise NotImplementedError


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


@pytest.mark.parametrize("name", CHECKERS)
def test_every_checker_says_not_done_for_a_stub_and_survives_a_crash(name, one_thread):
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


# ------------------------------------------------------------------- the library refuses to answer the exercise
def _namespace(code: str) -> dict:
    """A student's cell, run the way a notebook runs it: the names it binds."""
    namespace: dict = {}
    exec(code, namespace)
    return namespace


def _caught(pi0_c, pc):
    """Calls the library, swallows its refusal and answers right: still wrong (the call is recorded)."""
    from mipo_lib.mi import conditional_pmi as f

    try:
        return f(pi0_c, pc)
    except Exception:  # noqa: BLE001
        return _cpmi_right(pi0_c, pc)


@pytest.mark.parametrize("student", [
    "from mipo_lib.mi import conditional_pmi as f\ndef answer(p, pc):\n    return f(p, pc)",
    "import mipo_lib.mi as m\ndef answer(p, pc):\n    return m.conditional_pmi(p, pc)",
    "from mipo_lib import mi\nkept = mi.conditional_pmi\ndef answer(p, pc):\n    return kept(p, pc)",
    "from mipo_lib.mi import conditional_mutual_information, conditional_pmi\n"
    "def answer(p, pc):\n    conditional_mutual_information(p, pc)\n    return conditional_pmi(p, pc)",
], ids=["aliased-import", "module-alias", "bound-before-the-check", "another-library-function-first"])
def test_calling_the_library_function_through_any_alias_is_wrong(student):
    """Before this check a student passed exercise 4 of notebook 01 by calling `mi.conditional_pmi`: whatever name
    reaches it, it now refuses while the student's function runs, and works again afterwards."""
    original = mi.conditional_pmi.__code__
    verdict = exercises.check_conditional_pmi(_namespace(student)["answer"])
    assert verdict.ok is False and "mipo_lib.mi.conditional_" in verdict.message and "write it yourself" in verdict.message
    assert mi.conditional_pmi.__code__ is original
    pi0_c, pc = mi.random_world(6, 5, 0.5, seed=3)[0].reshape(2, 3, 5), np.full((2, 3), 1 / 3)
    assert np.allclose(mi.conditional_pmi(pi0_c, pc), _cpmi_right(pi0_c, pc))


def test_a_refusal_caught_by_the_student_is_still_wrong():
    verdict = exercises.check_conditional_pmi(_caught)
    assert verdict.ok is False and "mipo_lib.mi.conditional_pmi" in verdict.message


@pytest.mark.parametrize("check,student", [
    (exercises.check_mipo_pairs, "from mipo_lib.pairs import derangement as d\n"
                                 "def answer(prompts, positives, rng):\n    perm = d(len(prompts), rng)\n"
                                 "    return [(prompts[i], positives[i], positives[perm[i]]) for i in range(len(prompts))]"),
    (exercises.check_choose_level, "from mipo_lib.experiments import reasoning as r\n"
                                   "def answer(table, low, high):\n    return r.choose_level(table, (low, high))"),
    (exercises.check_bootstrap_ci, "from mipo_lib.analysis.stats import bootstrap_ci as b\n"
                                   "def answer(x, n, rng):\n    return b(x, n_boot=n)[1:]"),
    (exercises.check_sequence_logprob, "from mipo_lib.scoring import selective_log_softmax as s\n"
                                       "def answer(logits, ids, mask):\n"
                                       "    return (s(logits[:, :-1], ids[:, 1:]) * mask[:, 1:]).sum(-1)"),
], ids=["pairs.derangement", "reasoning.choose_level", "stats.bootstrap_ci", "scoring.selective_log_softmax"])
def test_other_exercises_refuse_their_library_function(check, student):
    verdict = check(_namespace(student)["answer"])
    assert verdict.ok is False and "the library's" in verdict.message, verdict.message


def test_the_library_is_restored_when_the_student_crashes_and_bad_names_fail_loudly():
    from mipo_lib import pairs

    original = pairs.derangement.__code__
    assert exercises.check_mipo_pairs(lambda *a: 1 / 0).ok is False
    assert pairs.derangement.__code__ is original and len(pairs.derangement(5, np.random.default_rng(0))) == 5
    with pytest.raises(MipoError, match="no module"):
        exercises._library_functions("nowhere.at_all")


# ---------------------------------------------------------------------------- notebook 03: a LoRA-DPO step by hand
def _reply_logps(model, batch, side):
    ids = batch[f"{side}_input_ids"]
    logits = model(input_ids=ids, attention_mask=batch[f"{side}_attention_mask"]).logits[:, :-1].float()
    token = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token * batch[f"{side}_reply_mask"][:, 1:]).sum(-1)


def _step(model, batch, beta, optimizer, scale=1.0, detach=False, backward_twice=False, step=True):
    pc, pr = _reply_logps(model, batch, "chosen"), _reply_logps(model, batch, "rejected")
    pr = pr.detach() if detach else pr
    margin = scale * beta * ((pc - batch["ref_chosen_logps"]) - (pr - batch["ref_rejected_logps"]))
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    optimizer.zero_grad()
    loss.backward(retain_graph=backward_twice)
    if backward_twice:
        loss.backward()
    if step:
        optimizer.step()
    return loss


@pytest.mark.parametrize("fn,ok,hint", [
    (_step, True, "equal TRL's"),
    (lambda *a: _step(*a, scale=10.0), False, "scaled by beta"),
    (lambda *a: _step(*a, detach=True), False, "detached"),
    (lambda *a: _step(*a, backward_twice=True), False, "twice"),
    (lambda *a: _step(*a, step=False), False, "no step was taken"),
    (lambda m, b, beta, o: _step(m, {**b, "ref_chosen_logps": 0 * b["ref_chosen_logps"],
                                     "ref_rejected_logps": 0 * b["ref_rejected_logps"]}, beta, o), False, "reference"),
], ids=["right", "no-beta", "detached", "backward-twice", "no-step", "no-reference"])
def test_the_lora_dpo_step_is_checked_against_trls_loss_and_gradients(fn, ok, hint, one_thread):
    verdict = exercises.check_lora_dpo_step(fn)
    assert verdict.ok is ok and hint in verdict.message, verdict.message


# ------------------------------------------------------------------------------------ the student edition
def _defines(cell, name):
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in ast.parse(editions.source(cell)).body)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_is_a_statement_a_stub_and_a_check_and_no_solution_is_left(path):
    nb = editions.read(path)
    found = editions.exercise_cells(nb, path.name)
    listed = EXERCISES.get(path.name[:2], ())
    assert [e.checker for e in found] == [e.checker for e in listed], f"{path.name}: exercises out of EXERCISES' order"
    for cells, exercise in zip(found, listed):
        assert _defines(cells.stub, exercise.function) and "raise NotImplementedError" in editions.source(cells.stub)
        assert f"exercises.{exercise.checker}({exercise.function})" in editions.source(cells.check)
    stubs = sum(editions.STUB in editions.tags(c) for c in nb["cells"])
    assert stubs == len(listed), f"{path.name}: a stub cell outside the statement-stub-check pattern"
    assert not [c for c in nb["cells"] if editions.SOLUTION in editions.tags(c)], f"{path.name}: a solution cell"
    prose = " ".join(editions.source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert not re.search(r"\bthe solution\b", prose, re.I), f"{path.name}: prose about 'the solution'"
    if listed:
        assert f"solutions/{path.stem}_solutions.ipynb" in prose, f"{path.name}: say where the solutions are"


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=lambda p: p.stem)
def test_committed_checks_say_not_done_yet(path):
    for cells in editions.exercise_cells(editions.read(path), path.name):
        texts = ["".join(o.get("data", {}).get("text/plain", o.get("text", ""))) for o in cells.check.get("outputs", [])]
        assert texts and all(t.startswith(NOT_DONE) for t in texts), f"{path.name}: check {cells.check['id']} shows {texts}"
        assert cells.check.get("execution_count") is not None, f"{path.name}: nbval refuses an output of an unrun cell"


def _verdict_of_check(check_source: str, namespace: dict) -> exercises.Verdict:
    """Run a check cell as Jupyter does: its last line is the expression whose value the cell shows."""
    tree = ast.parse(check_source)
    last = tree.body.pop()
    exec(compile(tree, "<check>", "exec"), namespace)
    return eval(compile(ast.Expression(last.value), "<check>", "eval"), namespace)


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=lambda p: p.stem)
def test_run_all_on_the_exercise_cells_says_not_done_yet_everywhere(path, one_thread):
    """The exercise cells of a student notebook, run top to bottom after the set-up (as Run all and the grader run
    them): every check says "not done yet", none "right". The whole notebooks run under nbval (test_notebooks)."""
    namespace: dict = {}
    exec(editions.SETUP, namespace)
    verdicts = []
    for cells in editions.exercise_cells(editions.read(path), path.name):
        exec(editions.source(cells.stub), namespace)
        verdicts.append(_verdict_of_check(editions.source(cells.check), namespace))
    assert verdicts and all(v.ok is None and v.message.startswith(NOT_DONE) for v in verdicts), verdicts


#: (notebook, exercise function, code that gives the answer away): the exercise must come first.
REVEALED_BY = [
    ("01", "world_summary", "m = px @ pi0"),
    ("01", "pmi_and_kl", "def closed_form(beta):"),
    ("01", "log_partition", "threshold = beta * np.logaddexp.reduce"),
    ("01", "conditional_pmi_table", "cpmi = np.log(pi0_c)"),
    ("02", "mipo_pairs", "def my_derangement(n, rng):"),
    ("03", "dpo_pair", "def dpo_loss(pc, pr, rc, rr, beta):"),
    ("03", "logged_rewards", "def dpo_loss(pc, pr, rc, rr, beta):"),
    ("03", "sequence_logprob", "def logprob_by_hand("),
    ("03", "lora_dpo_step", "pipeline.train_for_seed("),
    ("03", "lora_dpo_step", "dpo.trl_loss_gradients("),
    ("04", "cad_scores", "inspect.getsource(evaluate.ContextAwareDecoding"),
    ("04", "cad_scores", "by_formula = (1 + a)"),
]


@pytest.mark.parametrize("number,function,reveal", REVEALED_BY, ids=lambda v: str(v)[:24])
def test_each_exercise_comes_before_the_code_that_reveals_it(number, function, reveal):
    path = next(p for p in NOTEBOOKS if p.name.startswith(number))
    cells = editions.read(path)["cells"]
    stub = next(i for i, c in enumerate(cells) if editions.STUB in editions.tags(c) and _defines(c, function))
    revealing = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and reveal in editions.source(c)]
    assert revealing and stub < min(revealing), f"{path.name}: exercise {function} comes after {reveal!r}"


# ------------------------------------------------------------------------------------------------ the solutions
def test_the_solutions_notebooks_are_what_the_builder_makes():
    assert [p.name for p in SOLUTIONS] == [editions.solutions_path(p).name for p in WITH_EXERCISES]
    assert editions.stale_solutions(ROOT / "notebooks", write=False) == [], "run `make solutions`"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_every_solution_passes_its_checker(path, one_thread):
    """Each solutions notebook, run top to bottom in-process (its Colab cell does nothing off Colab): every check
    says "right", and there is one per exercise of its notebook."""
    nb = editions.read(path)
    namespace: dict = {"__name__": "__main__"}
    verdicts = {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        if editions.CHECK in editions.tags(cell):
            verdicts[editions.checker_of(cell)] = _verdict_of_check(editions.source(cell), namespace)
        else:
            exec(compile(editions.source(cell), f"{path.name}:{cell['id']}", "exec"), namespace)
    assert list(verdicts) == [e.checker for e in EXERCISES[path.name[:2]]]
    assert all(v.ok is True for v in verdicts.values()), verdicts


def _edited_copy(tmp_path):
    folder = tmp_path / "notebooks"
    (folder / "solutions").mkdir(parents=True)
    source = next(p for p in NOTEBOOKS if p.name.startswith("02"))
    nb = editions.read(source)
    (folder / "solutions" / editions.solutions_path(source).name).write_bytes(editions.solutions_path(source).read_bytes())
    return folder, source.name, nb


def test_the_builder_copies_edited_statements_and_keeps_the_solutions(tmp_path):
    folder, name, nb = _edited_copy(tmp_path)
    first = editions.exercise_cells(nb, name)[0]
    first.statement["source"] = ["**Exercise 1 — reworded.**"]
    (folder / name).write_text(editions.dumps(nb))
    assert editions.stale_solutions(folder, write=True) == [folder / "solutions" / f"{Path(name).stem}_solutions.ipynb"]
    built = editions.read(folder / "solutions" / f"{Path(name).stem}_solutions.ipynb")
    sources = [editions.source(c) for c in built["cells"]]
    assert "**Exercise 1 — reworded.**" in sources
    kept = editions.solution_blocks(editions.read(editions.solutions_path(ROOT / "notebooks" / name)))
    assert editions.solution_blocks(built) == kept
    assert editions.stale_solutions(folder, write=False) == []


def test_a_new_exercise_gets_a_placeholder_that_fails_until_solved(tmp_path):
    folder, name, nb = _edited_copy(tmp_path)
    cells = editions.exercise_cells(nb, name)[0]
    extra = [json.loads(json.dumps(c)) for c in (cells.statement, cells.stub, cells.check)]
    for cell, suffix in zip(extra, ("md", "stub", "check")):
        cell["id"] = f"new-{suffix}"
    extra[2]["source"] = ["from mipo_lib.workbook import exercises\n", "\n", "exercises.check_dpo_pair(mipo_pairs)"]
    nb["cells"][-1:-1] = extra
    (folder / name).write_text(editions.dumps(nb))
    editions.stale_solutions(folder, write=True)
    block = editions.solution_blocks(editions.read(folder / "solutions" / f"{Path(name).stem}_solutions.ipynb"))["check_dpo_pair"]
    assert len(block) == 1 and "raise NotImplementedError" in editions.source(block[0])


def test_the_builder_names_a_stub_without_its_statement():
    nb = {"cells": [{"cell_type": "code", "id": "s", "metadata": {"tags": ["stub"]}, "source": "def f():\n    raise NotImplementedError"}]}
    with pytest.raises(MipoError, match="statement"):
        editions.exercise_cells(nb, "x.ipynb")


def test_the_builder_needs_only_the_standard_library():
    code = ("import sys\nfrom mipo_lib.workbook import editions\nrc = editions.main(['--check'])\n"
            "heavy = {'numpy', 'torch', 'pandas', 'nbformat'} & set(sys.modules)\nassert not heavy, heavy\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
