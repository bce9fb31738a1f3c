"""Closed forms of MIPO on a *tabular* world, taught and checked in notebook 01.

A tabular world is a base model written as a table, ``pi0[x, y] = pi0(y | x)`` (rows sum to one), and a prompt
distribution ``px[x] = p(x)``. Everything here is exact (sums over the table, no sampling), so the notebook can show
that the formulas of the derivation are not approximations:

- the marginal ``pi0(y) = sum_x p(x) pi0(y|x)`` is what a response to a *random other prompt* is a sample of;
- ``pmi0(x; y) = log pi0(y|x) - log pi0(y)`` and ``I0(X; Y) = E[pmi0]``;
- a MIPO pair (x, y+ ~ pi0(.|x), y- ~ pi0(.|x'), x' ~ p) is Bradley-Terry / 2-way InfoNCE data whose population-
  optimal critic is ``pmi0 + c(x)``; so the optimum of the *population* DPO loss is the exponential tilt
  ``pi*(y|x) ∝ pi0(y|x)^(1+1/beta) / pi0(y)^(1/beta)``;
- ``I0 >= log 2 - L`` for the 2-way InfoNCE loss L of any critic (at most log 2 nats certified with one negative);
- the trained policy's own MI, ``I_pi*(X; Y)``, which the exact checks find above ``I0`` (`optimum_mutual_information`).

The negative distribution is a parameter (``neg[x, y]``, the law of y- given the prompt x) because the derivation
only uses it through the tilt ``pi*(y|x) ∝ pi0(y|x) (pi0(y|x) / neg(y|x))^(1/beta)``. That one formula covers the full
marginal, the leave-one-out marginal (negatives only from prompts x' != x, as a shuffled list of positives realises
it), random-context negatives (exact conditional PMI) and context-drop negatives (an approximation).

numpy for the closed forms, torch (float64) only for the DPO loss and its fit. No TRL here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mipo_lib.errors import MipoError

__all__ = [
    "LOG2",
    "random_world",
    "marginal",
    "pmi",
    "mutual_information",
    "negative_distribution",
    "tilt",
    "mipo_optimum",
    "optimum_mutual_information",
    "pair_weights",
    "pairwise_loss",
    "infonce_bound",
    "dpo_population_loss",
    "fit_tabular_dpo",
    "conditional_pmi",
    "conditional_mutual_information",
    "flatten_contexts",
]

LOG2 = math.log(2.0)
_ATOL = 1e-8


def _check_world(pi0: np.ndarray, px: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a world and return float64 copies; px defaults to uniform.

    Strictly positive probabilities are required: the PMI of a response the base model never produces is -inf, and
    DPO's log-ratios are undefined there (a real LM never assigns exactly zero, so this costs no generality).
    """
    pi0 = np.asarray(pi0, dtype=np.float64)
    if pi0.ndim != 2:
        raise MipoError(f"pi0 must be a 2-d table pi0[x, y]; got shape {pi0.shape}")
    if np.any(pi0 <= 0) or not np.allclose(pi0.sum(axis=1), 1.0, atol=1e-6):
        raise MipoError("pi0 rows must be strictly positive and sum to 1 (mix in a tiny uniform floor if needed)")
    if px is None:
        px = np.full(pi0.shape[0], 1.0 / pi0.shape[0])
    px = np.asarray(px, dtype=np.float64)
    if px.shape != (pi0.shape[0],) or np.any(px < 0) or not np.isclose(px.sum(), 1.0, atol=1e-6):
        raise MipoError(f"px must be a distribution over the {pi0.shape[0]} prompts; got {px}")
    return pi0, px


def random_world(
    n_prompts: int, n_responses: int, concentration: float = 1.0, seed: int = 0, floor: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded tabular base model: each row ``pi0(.|x) ~ Dirichlet(concentration)``, uniform p(x).

    Small concentrations give peaked, prompt-specific rows (high MI); large ones make every row close to uniform and
    to the others (MI -> 0). A ``floor`` of uniform mass keeps every probability positive (see `_check_world`).
    """
    rng = np.random.default_rng(seed)
    rows = rng.dirichlet(np.full(n_responses, float(concentration)), size=n_prompts)
    pi0 = (1.0 - floor) * rows + floor / n_responses
    pi0 /= pi0.sum(axis=1, keepdims=True)
    return pi0, np.full(n_prompts, 1.0 / n_prompts)


def marginal(pi0: np.ndarray, px: np.ndarray | None = None) -> np.ndarray:
    """``pi0(y) = sum_x p(x) pi0(y|x)``: the distribution of a response to a random prompt.

    It is the law of MIPO's negative y- ~ pi0(.|x'), x' ~ p (one draw of x', then one draw of y): a negative is a
    one-sample Monte-Carlo estimate of this average, which is why a single negative is a noisy estimate.
    """
    pi0, px = _check_world(pi0, px)
    return px @ pi0


def pmi(pi0: np.ndarray, px: np.ndarray | None = None) -> np.ndarray:
    """Pointwise mutual information ``pmi0(x; y) = log pi0(y|x) - log pi0(y)``, a table like pi0.

    Positive where the response is more likely given this prompt than given a random prompt: prompt-specific
    answers score high, generic ones ("I'm happy to help!") score near or below zero, whatever their probability.
    """
    pi0, px = _check_world(pi0, px)
    return np.log(pi0) - np.log(px @ pi0)[None, :]


def mutual_information(pi0: np.ndarray, px: np.ndarray | None = None) -> float:
    """``I0(X; Y) = E_{x~p, y~pi0(.|x)} pmi0(x; y)`` in nats (>= 0, = 0 iff every row equals the marginal)."""
    pi0, px = _check_world(pi0, px)
    return float(np.sum(px[:, None] * pi0 * pmi(pi0, px)))


def negative_distribution(pi0: np.ndarray, px: np.ndarray | None = None, exclude_self: bool = False) -> np.ndarray:
    """``neg[x, y]``: the law of MIPO's negative y- for prompt x.

    ``exclude_self=False``: x' ~ p independently of x, so y- ~ pi0(y) for every x (the derivation's assumption).
    ``exclude_self=True``: x' ~ p(. | x' != x), the *leave-one-out* marginal
    ``(pi0(y) - p(x) pi0(y|x)) / (1 - p(x))``. That is what a derangement of the positives realises, and also a plain
    shuffle (its fixed points give chosen == rejected, a constant loss log 2 with zero gradient, i.e. no pair). It
    differs from the marginal by O(p(x)) = O(1/N), so with few prompts the DPO optimum moves (see `mipo_optimum`).
    """
    pi0, px = _check_world(pi0, px)
    m = px @ pi0
    if not exclude_self:
        return np.broadcast_to(m, pi0.shape).copy()
    if np.any(px >= 1.0):
        raise MipoError("exclude_self needs at least two prompts with positive probability")
    return (m[None, :] - px[:, None] * pi0) / (1.0 - px[:, None])


def tilt(pi0: np.ndarray, neg: np.ndarray, beta: float) -> np.ndarray:
    """The DPO optimum for pairs (y+ ~ pi0(.|x)) > (y- ~ neg(.|x)): ``pi ∝ pi0 (pi0 / neg)^(1/beta)`` per row.

    Why: the population-optimal Bradley-Terry critic for such pairs is ``log pi0(y|x) - log neg(y|x) + c(x)``
    (see `pairwise_loss`), and DPO's implicit reward ``beta log pi/pi0`` can equal it for every (x, y) exactly when
    pi has this form; the per-prompt constant c(x) is absorbed by the softmax normalisation.
    """
    if beta <= 0:
        raise MipoError(f"beta must be positive; got {beta}")
    pi0 = np.asarray(pi0, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    logits = np.log(pi0) + (np.log(pi0) - np.log(neg)) / beta
    logits -= logits.max(axis=-1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=-1, keepdims=True)


def mipo_optimum(pi0: np.ndarray, px: np.ndarray | None, beta: float, exclude_self: bool = False) -> np.ndarray:
    """MIPO's closed-form optimum ``pi*(y|x) ∝ pi0(y|x)^(1+1/beta) / pi0(y)^(1/beta) = pi0(y|x) exp(pmi0/beta)``.

    KL-regularised maximisation of the base model's PMI: beta -> inf gives pi0 back, beta -> 0 puts all mass on the
    response of highest PMI. With ``exclude_self=True`` the marginal is replaced by the leave-one-out marginal (the
    exact optimum when negatives never come from the same prompt, see `negative_distribution`).
    """
    pi0, px = _check_world(pi0, px)
    return tilt(pi0, negative_distribution(pi0, px, exclude_self), beta)


def optimum_mutual_information(
    pi0: np.ndarray, px: np.ndarray | None, beta: float, exclude_self: bool = False
) -> float:
    """``I_pi*(X; Y)``: the mutual information between prompt and response of MIPO's optimum `mipo_optimum`.

    The derivation says MIPO maximises the *base* model's PMI under a KL leash; whether the trained policy's own MI
    rises is a separate question, answered here exactly (notebook 01 compares it with ``I0`` over many worlds).
    Computed from log-probabilities: at small beta the optimum underflows to exact zeros in probability space, and a
    zero row entry must contribute ``0 log 0 = 0``, not NaN.
    """
    if beta <= 0:
        raise MipoError(f"beta must be positive; got {beta}")
    pi0, px = _check_world(pi0, px)
    neg = negative_distribution(pi0, px, exclude_self)
    logits = np.log(pi0) + (np.log(pi0) - np.log(neg)) / beta  # the tilt of `tilt`, kept in log space
    log_pol = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)  # log pi*(y|x)
    with np.errstate(divide="ignore"):
        log_px = np.log(px)
    log_marg = np.logaddexp.reduce(log_px[:, None] + log_pol, axis=0)  # log pi*(y) = log sum_x p(x) pi*(y|x)
    return float(np.sum(px[:, None] * np.exp(log_pol) * (log_pol - log_marg[None, :])))


def pair_weights(pi0: np.ndarray, px: np.ndarray | None = None, neg: np.ndarray | None = None) -> np.ndarray:
    """``W[x, a, b] = p(x) pi0(a|x) neg(b|x)``: probability of the pair (x, y+=a, y-=b); neg defaults to the marginal."""
    pi0, px = _check_world(pi0, px)
    neg = negative_distribution(pi0, px) if neg is None else np.asarray(neg, dtype=np.float64)
    if neg.shape != pi0.shape:
        raise MipoError(f"neg must have pi0's shape {pi0.shape}; got {neg.shape}")
    return px[:, None, None] * pi0[:, :, None] * neg[:, None, :]


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def pairwise_loss(
    critic: np.ndarray, pi0: np.ndarray, px: np.ndarray | None = None, neg: np.ndarray | None = None
) -> float:
    """Exact 2-way InfoNCE / Bradley-Terry loss ``E[-log sigmoid(h(x,y+) - h(x,y-))]`` of a critic table h.

    For an unordered pair {a, b} at prompt x the data say "a is the positive" with odds
    ``pi0(a|x) neg(b|x) : pi0(b|x) neg(a|x)``; the logistic loss is minimised pair by pair when the critic difference
    equals the log of those odds, i.e. ``h = log pi0/neg + c(x)``: the PMI when neg is the marginal. Since one critic
    achieves every pair's optimum at once, it is the global minimiser (unique up to c(x) when all pi0 > 0).
    """
    h = np.asarray(critic, dtype=np.float64)
    w = pair_weights(pi0, px, neg)
    return float(np.sum(w * _softplus(-(h[:, :, None] - h[:, None, :]))))


def infonce_bound(
    pi0: np.ndarray, px: np.ndarray | None = None, critic: np.ndarray | None = None
) -> float:
    """``log 2 - L``: the 2-way InfoNCE lower bound on I0(X; Y) certified by a critic (default: the optimal one, pmi0).

    Holds for every critic when the negative is an independent draw from the marginal; never exceeds log 2 because
    L >= 0. With the optimal critic it is the best that one negative can certify: ``<= min(I0, log 2)``.
    """
    pi0, px = _check_world(pi0, px)
    h = pmi(pi0, px) if critic is None else critic
    return LOG2 - pairwise_loss(h, pi0, px)


def dpo_population_loss(
    logits: torch.Tensor | np.ndarray,
    pi0: np.ndarray,
    px: np.ndarray | None,
    beta: float,
    neg: np.ndarray | None = None,
) -> torch.Tensor:
    """Exact expected DPO loss on the MIPO pair distribution, as a differentiable torch scalar (float64).

    ``logits[x, y]`` parametrise the policy ``pi = softmax(logits)`` row-wise; the DPO margin of a pair is
    ``beta (log pi/pi0 (y+|x) - log pi/pi0 (y-|x))`` and the loss ``E_{x, y+, y-} -log sigmoid(margin)`` is summed
    exactly over the table with the weights of `pair_weights`. With ``logits = log pi0`` every margin is 0 and the
    loss is exactly log 2 = 0.6931 (DPO's sanity value at initialisation). The loss is convex in the logits (a
    logistic loss of a linear function of them), so gradient descent reaches its global minimum.
    """
    w = torch.as_tensor(pair_weights(pi0, px, neg), dtype=torch.float64)
    log_pi0 = torch.log(torch.as_tensor(np.asarray(pi0, dtype=np.float64)))
    return _dpo_loss_from_tables(torch.as_tensor(logits, dtype=torch.float64), log_pi0, w, beta)


def _dpo_loss_from_tables(logits: torch.Tensor, log_pi0: torch.Tensor, w: torch.Tensor, beta: float) -> torch.Tensor:
    h = beta * (torch.log_softmax(logits, dim=-1) - log_pi0)  # DPO's implicit reward beta log pi/pi0
    margin = h[:, :, None] - h[:, None, :]  # h(x, y+) - h(x, y-) for every ordered pair
    return torch.sum(w * torch.nn.functional.softplus(-margin))


def fit_tabular_dpo(
    pi0: np.ndarray,
    px: np.ndarray | None,
    beta: float,
    neg: np.ndarray | None = None,
    steps: int = 500,
    seed: int = 0,
    init_noise: float = 1.0,
    tolerance: float = 1e-12,
) -> np.ndarray:
    """Minimise `dpo_population_loss` over a free softmax policy with L-BFGS in float64; return the policy table.

    Starts from ``log pi0`` plus seeded Gaussian noise (scale ``init_noise``) so that the fit has to travel to the
    optimum rather than start near it. Deterministic for a given seed. The result should equal `tilt` (or
    `mipo_optimum` for marginal negatives) to optimiser precision (about 1e-8 in probability at the default
    gradient tolerance): that is the check notebook 01 makes. The loss is convex, so a few dozen L-BFGS iterations
    suffice; ``steps`` caps them.
    """
    pi0_arr, px_arr = _check_world(pi0, px)
    w = torch.as_tensor(pair_weights(pi0_arr, px_arr, neg), dtype=torch.float64)
    log_pi0 = torch.log(torch.as_tensor(pi0_arr))
    gen = torch.Generator().manual_seed(int(seed))
    start = log_pi0 + init_noise * torch.randn(pi0_arr.shape, generator=gen, dtype=torch.float64)
    logits = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [logits],
        lr=1.0,
        max_iter=steps,
        history_size=20,
        tolerance_grad=tolerance,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _dpo_loss_from_tables(logits, log_pi0, w, beta)
        loss.backward()
        return loss

    # Tables this small are pure per-op overhead: torch's thread pool only adds contention (10-30x slower on a
    # busy 2-core machine), so run single-threaded and restore the caller's setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return torch.softmax(logits.detach(), dim=-1).numpy()


def conditional_pmi(pi0_c: np.ndarray, pc_given_x: np.ndarray) -> np.ndarray:
    """Conditional PMI ``pmi0(c; y | x) = log pi0(y|x,c) - log sum_c' p(c'|x) pi0(y|x,c')`` as a table [x, c, y].

    The personalization reward: how much more likely the response is with *this* user's context c than with a
    random user's context for the same request x. Its subtrahend is the mixture over contexts, which is the law of
    a random-context negative, but not the base model's answer with the context *dropped* (a different conditional,
    since a model is not obliged to be the mixture of its context-conditioned selves); so context-drop negatives
    optimise ``log pi0(y|x,c) - log pi0(y|x)``, only an approximation of this.
    """
    pi0_c = np.asarray(pi0_c, dtype=np.float64)
    pc = np.asarray(pc_given_x, dtype=np.float64)
    if pi0_c.ndim != 3 or pc.shape != pi0_c.shape[:2]:
        raise MipoError(f"need pi0_c[x, c, y] and pc_given_x[x, c]; got {pi0_c.shape} and {pc.shape}")
    mixture = np.einsum("xc,xcy->xy", pc, pi0_c)
    return np.log(pi0_c) - np.log(mixture)[:, None, :]


def conditional_mutual_information(pi0_c: np.ndarray, pc_given_x: np.ndarray, px: np.ndarray | None = None) -> float:
    """``I0(C; Y | X) = E[pmi0(c; y | x)]`` in nats."""
    pi0_c = np.asarray(pi0_c, dtype=np.float64)
    n_x = pi0_c.shape[0]
    px = np.full(n_x, 1.0 / n_x) if px is None else np.asarray(px, dtype=np.float64)
    weights = px[:, None, None] * np.asarray(pc_given_x)[:, :, None] * pi0_c
    return float(np.sum(weights * conditional_pmi(pi0_c, pc_given_x)))


def flatten_contexts(
    pi0_c: np.ndarray, pc_given_x: np.ndarray, px: np.ndarray | None = None, neg_xy: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Treat each (x, c) as one prompt so the unconditional tools apply to the personalization version.

    Returns ``(pi0, p(x, c), neg)`` with rows indexed by x * C + c. ``neg_xy[x, y]`` is the negative's law for request
    x (the same for every context): pass the base model's context-free answer ``pi0(y|x)`` for context-drop
    negatives; the default is the mixture over contexts, the law of a random-context negative.
    """
    pi0_c = np.asarray(pi0_c, dtype=np.float64)
    pc = np.asarray(pc_given_x, dtype=np.float64)
    n_x, n_c, n_y = pi0_c.shape
    px = np.full(n_x, 1.0 / n_x) if px is None else np.asarray(px, dtype=np.float64)
    if neg_xy is None:
        neg_xy = np.einsum("xc,xcy->xy", pc, pi0_c)
    neg = np.repeat(np.asarray(neg_xy, dtype=np.float64)[:, None, :], n_c, axis=1)
    return pi0_c.reshape(n_x * n_c, n_y), (px[:, None] * pc).reshape(-1), neg.reshape(n_x * n_c, n_y)
