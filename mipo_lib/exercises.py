"""Exercises a student fills in and a teacher can grade: checkers that say "right", or what is wrong with a hint,
without printing the answer; and the student edition of the notebooks (solutions removed).

An exercise in a notebook is three cells: a **stub** (tag ``stub``) that defines a function raising
`NotImplementedError`, a **solution** (tag ``solution``, hidden on Colab and in JupyterLab, no committed outputs) that
redefines it and asserts its own checker, and a **check** cell that calls the checker from this module. Run top to
bottom, the workbook's check cells print "right"; in the student edition (``make student``), where the solution cells
are gone, they print "not done yet" until the student has written the function.

Each checker runs the student's function on small seeded inputs, compares it with the reference implementation, and,
when they differ, tries the usual mistakes one by one (a hint names the mistake, never the expected numbers).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mipo_lib import mi

__all__ = [
    "NOT_DONE",
    "Verdict",
    "check_sequence_logprob",
    "check_mipo_pairs",
    "check_conditional_pmi",
    "student_edition",
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


def _run(fn: Callable[..., Any], *args: Any) -> tuple[Any, Verdict | None]:
    """Call the student's function; an untouched stub (NotImplementedError or None) is "not done yet", any other
    exception is reported as what it is, so the check cell never crashes."""
    try:
        out = fn(*args)
    except NotImplementedError:
        return None, Verdict(None, f"{NOT_DONE}: replace the `raise NotImplementedError` in the stub with your code")
    except Exception as exc:  # noqa: BLE001 - a student's bug is a verdict, not a crash of the check cell
        return None, Verdict(False, f"your function raised {type(exc).__name__}: {exc}")
    if out is None:
        return None, Verdict(None, f"{NOT_DONE}: the function returns None (did you forget `return`?)")
    return out, None


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
    out, verdict = _run(fn, logits.clone(), ids.clone(), mask.clone())
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
        out, verdict = _run(fn, list(prompts), list(positives), np.random.default_rng(seed))
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
    out, verdict = _run(fn, pi0_c.copy(), pc.copy())
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


# ------------------------------------------------------------------------------------------ student edition
def student_edition(notebooks: Sequence[Path], out_dir: Path) -> list[Path]:
    """Write a copy of each notebook without its ``solution`` cells (nbconvert's TagRemovePreprocessor) and return
    the written paths. Stubs, check cells and every other cell stay as they are, outputs included."""
    import nbformat
    from nbconvert.preprocessors import TagRemovePreprocessor
    from traitlets.config import Config

    config = Config()
    config.TagRemovePreprocessor.remove_cell_tags = ("solution",)
    config.TagRemovePreprocessor.enabled = True
    remover = TagRemovePreprocessor(config=config)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        nb, _ = remover.preprocess(nb, {})
        target = out_dir / path.name
        nbformat.write(nb, target)
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m mipo_lib.exercises student [--out student]`: the student edition of the numbered notebooks."""
    from mipo_lib.config import repo_root

    parser = argparse.ArgumentParser(prog="python -m mipo_lib.exercises")
    sub = parser.add_subparsers(dest="command", required=True)
    student = sub.add_parser("student", help="write the notebooks without their solution cells")
    student.add_argument("--out", type=Path, default=repo_root() / "student", help="output folder (default: student/)")
    args = parser.parse_args(argv)
    paths = sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for path in student_edition(paths, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
