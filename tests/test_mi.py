"""Unit tests of mipo_lib.mi: the closed forms of notebook 01 and the exact tabular DPO fit that checks them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mipo_lib import mi
from mipo_lib.errors import MipoError


@pytest.fixture(scope="module")
def world() -> tuple[np.ndarray, np.ndarray]:
    return mi.random_world(4, 6, concentration=1.0, seed=0)


def test_marginal_is_a_distribution_and_the_prompt_average(world):
    pi0, px = world
    m = mi.marginal(pi0, px)
    assert m.shape == (6,)
    assert math.isclose(m.sum(), 1.0, abs_tol=1e-12)
    assert np.allclose(m, pi0.mean(axis=0))  # uniform p(x)
    skewed = np.array([0.7, 0.1, 0.1, 0.1])
    assert np.allclose(mi.marginal(pi0, skewed), 0.7 * pi0[0] + 0.1 * pi0[1:].sum(axis=0))


def test_mutual_information_hand_computed_2x2():
    pi0 = np.array([[0.8, 0.2], [0.4, 0.6]])
    px = np.array([0.5, 0.5])
    # marginal (0.6, 0.4)
    hand = 0.5 * (0.8 * math.log(0.8 / 0.6) + 0.2 * math.log(0.2 / 0.4)) + 0.5 * (
        0.4 * math.log(0.4 / 0.6) + 0.6 * math.log(0.6 / 0.4)
    )
    assert math.isclose(mi.mutual_information(pi0, px), hand, rel_tol=1e-12)
    assert math.isclose(hand, 0.0863, abs_tol=1e-4)
    assert np.allclose(mi.pmi(pi0, px), np.log(pi0 / np.array([0.6, 0.4])))


def test_mutual_information_nonnegative_and_zero_when_independent(world):
    pi0, px = world
    assert mi.mutual_information(pi0, px) > 0.0
    for seed in range(5):
        p, q = mi.random_world(3, 5, concentration=0.3, seed=seed)
        assert mi.mutual_information(p, q) >= 0.0
    same_rows = np.tile(np.array([0.1, 0.2, 0.3, 0.4]), (3, 1))
    assert abs(mi.mutual_information(same_rows, None)) < 1e-14
    assert np.allclose(mi.pmi(same_rows, None), 0.0)


def test_mipo_optimum_is_a_distribution_with_the_right_limits(world):
    pi0, px = world
    for beta in (0.1, 0.5, 1.0):
        opt = mi.mipo_optimum(pi0, px, beta)
        assert np.all(opt >= 0) and np.allclose(opt.sum(axis=1), 1.0)
        # the two written forms agree: pi0^(1+1/b)/m^(1/b)  and  pi0 exp(pmi/b)
        tilted = pi0 * np.exp(mi.pmi(pi0, px) / beta)
        assert np.allclose(opt, tilted / tilted.sum(axis=1, keepdims=True))
    assert np.allclose(mi.mipo_optimum(pi0, px, 1e6), pi0, atol=1e-5)  # beta -> inf: back to pi0
    sharp = mi.mipo_optimum(pi0, px, 1e-3)  # beta -> 0: argmax of the PMI
    assert np.array_equal(sharp.argmax(axis=1), mi.pmi(pi0, px).argmax(axis=1))
    assert np.all(sharp.max(axis=1) > 0.99)


def test_dpo_population_loss_is_log2_at_init_and_decreases(world):
    pi0, px = world
    init = np.log(pi0)
    for beta in (0.1, 1.0):
        assert math.isclose(mi.dpo_population_loss(init, pi0, px, beta).item(), math.log(2.0), rel_tol=1e-12)
    # adding a per-prompt constant to the logits changes nothing (softmax), the closed form lowers the loss
    shifted = init + np.arange(4.0)[:, None]
    assert math.isclose(mi.dpo_population_loss(shifted, pi0, px, 0.1).item(), math.log(2.0), rel_tol=1e-12)
    at_opt = mi.dpo_population_loss(np.log(mi.mipo_optimum(pi0, px, 0.1)), pi0, px, 0.1).item()
    assert at_opt < math.log(2.0) - 0.1
    assert isinstance(mi.dpo_population_loss(torch.tensor(init), pi0, px, 0.1), torch.Tensor)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_fit_tabular_dpo_matches_the_closed_form(world, beta):
    pi0, px = world
    fit = mi.fit_tabular_dpo(pi0, px, beta, seed=0)
    assert np.abs(fit - mi.mipo_optimum(pi0, px, beta)).max() < 1e-3
    assert np.abs(fit - mi.mipo_optimum(pi0, px, beta)).max() < 1e-6  # in fact to optimiser precision


def test_leave_one_out_negatives_move_the_optimum(world):
    pi0, px = world
    neg = mi.negative_distribution(pi0, px, exclude_self=True)
    assert np.allclose(neg.sum(axis=1), 1.0)
    # x' uniform over the 3 other prompts
    assert np.allclose(neg[0], pi0[1:].mean(axis=0))
    fit = mi.fit_tabular_dpo(pi0, px, 0.5, neg=neg, seed=1)
    assert np.abs(fit - mi.mipo_optimum(pi0, px, 0.5, exclude_self=True)).max() < 1e-6
    assert np.abs(fit - mi.mipo_optimum(pi0, px, 0.5)).max() > 0.05


def test_infonce_bound_below_min_of_mi_and_log2(world):
    pi0, px = world
    worlds = [world] + [mi.random_world(4, 6, c, seed=s) for c in (0.03, 0.3, 3.0, 30.0) for s in range(3)]
    for p, q in worlds:
        bound = mi.infonce_bound(p, q)
        assert 0.0 <= bound <= min(mi.mutual_information(p, q), math.log(2.0)) + 1e-12
    # the PMI critic is the best: any other critic certifies less
    rng = np.random.default_rng(0)
    best = mi.infonce_bound(pi0, px)
    for _ in range(5):
        assert mi.infonce_bound(pi0, px, critic=mi.pmi(pi0, px) + 0.3 * rng.normal(size=pi0.shape)) < best
    # zero critic (policy = pi0): loss log 2, bound 0
    assert abs(mi.infonce_bound(pi0, px, critic=np.zeros_like(pi0))) < 1e-12


def test_bradley_terry_probabilities_are_sigmoid_of_pmi_differences(world):
    pi0, px = world
    w = mi.pair_weights(pi0, px)
    assert math.isclose(w.sum(), 1.0, abs_tol=1e-12)
    h = mi.pmi(pi0, px)
    sig = 1.0 / (1.0 + np.exp(-(h[:, :, None] - h[:, None, :])))
    assert np.allclose(w / (w + w.transpose(0, 2, 1)), sig)


def test_conditional_version_and_context_drop():
    rows, _ = mi.random_world(6, 5, 0.5, seed=3)
    pi0_c = rows.reshape(2, 3, 5)
    pc = np.array([[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    cpmi = mi.conditional_pmi(pi0_c, pc)
    mixture = np.einsum("xc,xcy->xy", pc, pi0_c)
    assert np.allclose(cpmi, np.log(pi0_c / mixture[:, None, :]))
    assert mi.conditional_mutual_information(pi0_c, pc) > 0
    flat, pxc, neg = mi.flatten_contexts(pi0_c, pc)
    assert flat.shape == (6, 5) and math.isclose(pxc.sum(), 1.0) and np.allclose(neg[:3], mixture[0])
    target = flat * np.exp(cpmi.reshape(6, 5) / 0.5)
    target /= target.sum(axis=1, keepdims=True)
    assert np.allclose(mi.tilt(flat, neg, 0.5), target)
    # a context-free model that is not the mixture gives a different optimum (equal to context-aware decoding)
    no_ctx = np.full((2, 5), 0.2)
    _, _, neg_drop = mi.flatten_contexts(pi0_c, pc, neg_xy=no_ctx)
    drop = mi.tilt(flat, neg_drop, 0.5)
    cad = flat**3 / neg_drop**2
    assert np.allclose(drop, cad / cad.sum(axis=1, keepdims=True))
    assert np.abs(drop - target).max() > 0.01


def test_bad_inputs_fail_with_a_clear_error():
    with pytest.raises(MipoError, match="strictly positive"):
        mi.pmi(np.array([[1.0, 0.0], [0.5, 0.5]]), None)
    with pytest.raises(MipoError, match="distribution over"):
        mi.marginal(np.full((2, 2), 0.5), np.array([0.3, 0.3]))
    with pytest.raises(MipoError, match="beta"):
        mi.mipo_optimum(np.full((2, 2), 0.5), None, 0.0)


def test_optimum_mutual_information_matches_the_direct_sum_and_its_limits(world):
    pi0, px = world
    opt = mi.mipo_optimum(pi0, px, 1.0)
    direct = float(np.sum(px[:, None] * opt * (np.log(opt) - np.log(px @ opt)[None, :])))
    assert math.isclose(mi.optimum_mutual_information(pi0, px, 1.0), direct, rel_tol=1e-10)
    # beta -> inf: the optimum is pi0, so its MI is I0; beta -> 0 (exact zeros in probability): finite, no NaN
    assert math.isclose(mi.optimum_mutual_information(pi0, px, 1e6), mi.mutual_information(pi0, px), rel_tol=1e-5)
    sharp = mi.optimum_mutual_information(pi0, px, 1e-4)
    assert math.isfinite(sharp) and sharp <= math.log(len(px)) + 1e-12
    with pytest.raises(MipoError):
        mi.optimum_mutual_information(pi0, px, 0.0)


def test_the_mipo_optimum_has_more_mutual_information_than_the_base_model():
    """Checked, not proven: over seeded random worlds and betas the optimum's MI is never below I0."""
    rng = np.random.default_rng(1)
    for seed in range(40):
        n_x, n_y = int(rng.integers(2, 7)), int(rng.integers(2, 10))
        pi0, px = mi.random_world(n_x, n_y, float(10 ** rng.uniform(-1.5, 1.5)), seed=seed)
        for beta in (0.05, 0.1, 0.5, 1.0):
            assert mi.optimum_mutual_information(pi0, px, beta) >= mi.mutual_information(pi0, px) - 1e-12
