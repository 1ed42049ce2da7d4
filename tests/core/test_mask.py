"""The vectorised mask (verl_cppo.core.mask via the loss's per-token path) against the float64 loop reference."""

import itertools

import pytest
import torch

from tests.support.reference import LossParams, RefParams, near_threshold_row, random_case, reference_cppo
from verl_cppo.core.mask import position_weights, response_lengths, row_quantile, shuffled_positions
from verl_cppo.core.token_loss import cppo_token_losses

SETTINGS = [
    {},
    {"delta_b_quantile": None},
    {"delta_b_quantile": None, "delta_b": 0.015},
    {"position_horizon": 7},
    {"position_horizon": 64, "delta_b_quantile": 0.5, "delta_b_scale": 1.5, "delta_b_max_mult": 5.0},
    {"gate": "soft"},
    {"gate": "soft", "delta_b_quantile": None},
    {"divergence": "binary_kl", "delta": 0.05},
    {"position_weight": False},
    {"prefix_budget": False},
    {"w_min": 1.0, "prefix_budget": False},
    {"w_min": 0.3, "delta": 0.1, "delta_b": 0.005},
    {"delta_b": 0.0, "delta_b_quantile": None},
]


def _assert_same_mask(terms, ref):
    assert terms.gate.masked.tolist() == ref.masked
    assert terms.gate.masked_by_budget.tolist() == ref.by_budget
    torch.testing.assert_close(terms.gate.weight, torch.tensor(ref.weight, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(terms.gate.delta_b, torch.tensor(ref.delta_b, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
@pytest.mark.parametrize("spread", [0.05, 0.4, 2.0])
def test_mask_matches_reference_on_random_rows(setting, spread, gen):
    cfg, ref_params = LossParams(**setting), RefParams(**setting)
    masked = valid = 0
    for _ in range(4):
        old, new, adv, mask = random_case(gen, batch=7, width=37, spread=spread)
        terms = cppo_token_losses(old, new, adv, mask, cfg)
        ref = reference_cppo(old, new, adv, mask, ref_params)
        _assert_same_mask(terms, ref)
        masked, valid = masked + sum(map(sum, ref.masked)), valid + int(mask.sum())
    if spread >= 0.4:  # log-ratios of that spread put D far past delta: the rule rejects tokens and keeps others
        assert 0 < masked < valid, (masked, valid)
    # spread 0.05 (D mostly below delta) is the quiet regime: the code must agree there too, masking little


@pytest.mark.parametrize("rel", [1e-6, 1e-9])
@pytest.mark.parametrize("calibrated", [False, True])
def test_mask_matches_reference_near_threshold(rel, calibrated, gen):
    """Divergences within rel of the threshold (fixed delta_b, and calibrated with the cap binding)."""
    setting = {"delta_b_quantile": 0.9 if calibrated else None, "delta_b": 0.02}
    cfg, p = LossParams(**setting), RefParams(**setting)
    db = 0.04 if calibrated else 0.02  # the calibrated quantile of these rows is far above the 2x cap
    rows = [near_threshold_row(gen, 50, p, db, rel) for _ in range(6)]
    old = torch.stack([r[0] for r in rows])
    new = torch.stack([r[1] for r in rows])
    adv = torch.ones_like(old)  # pi > mu everywhere: every token moves away from mu
    mask = torch.ones_like(old, dtype=torch.bool)
    ref = reference_cppo(old, new, adv, mask, p)
    assert ref.delta_b == [db] * 6
    terms = cppo_token_losses(old, new, adv, mask, cfg)
    _assert_same_mask(terms, ref)
    flat = list(itertools.chain.from_iterable(ref.masked))
    assert 0.2 < sum(flat) / len(flat) < 0.8  # both sides of the threshold are hit


def test_shuffled_positions_are_a_permutation_and_match_reference(gen):
    lengths = torch.tensor([0, 1, 5, 9])
    pos = shuffled_positions(lengths, 9, generator=gen)
    for b, n in enumerate(lengths.tolist()):
        assert sorted(pos[b, :n].tolist()) == list(range(1, n + 1))
        assert pos[b, n:].tolist() == list(range(n + 1, 10))
    old, new, adv, mask = random_case(gen, batch=4, width=9, holes=0.0, spread=0.6)
    mask[:] = torch.arange(9)[None, :] < lengths[:, None]
    from verl_cppo.core.mask import cppo_mask

    cfg, p = LossParams(shuffle_positions=True), RefParams()
    terms = cppo_token_losses(old, new, adv, mask, LossParams())
    toward = adv * (terms.rho - 1) <= 0
    got = cppo_mask(terms.div, terms.valid, toward, cfg, lengths=lengths, positions=pos)
    ref = reference_cppo(old, new, adv, mask, p, positions=pos)
    assert got.masked.tolist() == ref.masked


def test_position_weights_hand_computed():
    pos = torch.arange(1, 6, dtype=torch.float64)[None, :]
    # H = 5, w_min = 0.8: 1, 0.95, 0.9, 0.85, 0.8
    torch.testing.assert_close(position_weights(pos, 5, 0.8), torch.tensor([[1.0, 0.95, 0.9, 0.85, 0.8]]).double())
    # H = 1: the single token weighs 1; positions past a fixed horizon stay at w_min
    assert position_weights(pos[:, :1], 1, 0.8).item() == 1.0
    torch.testing.assert_close(position_weights(pos, 3, 0.5), torch.tensor([[1.0, 0.75, 0.5, 0.5, 0.5]]).double())


def test_response_lengths_count_interior_holes():
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert response_lengths(mask).tolist() == [3, 0, 5]


def test_row_quantile_equals_torch_quantile(gen):
    values = torch.rand(5, 23, generator=gen, dtype=torch.float64)
    valid = torch.rand(5, 23, generator=gen) > 0.3
    valid[0] = False
    valid[1] = False
    valid[1, 4] = True
    got = row_quantile(values, valid, 0.9)
    for b in range(5):
        want = torch.quantile(values[b][valid[b]], 0.9) if valid[b].any() else torch.tensor(0.0, dtype=torch.float64)
        assert got[b].item() == want.item()
