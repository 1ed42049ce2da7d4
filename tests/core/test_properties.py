"""Property tests of the mask (hypothesis): monotonicity, toward-mu tokens, the first token, the soft gate."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.reference import LossParams
from verl_cppo.core.token_loss import cppo_token_losses

TOKEN = st.tuples(
    st.floats(-6.0, -0.01),  # log mu
    st.floats(-3.0, 3.0),  # log pi - log mu
    st.booleans(),  # response mask
)


@st.composite
def batches(draw):
    width = draw(st.integers(1, 14))
    rows = draw(st.lists(st.lists(TOKEN, min_size=width, max_size=width), min_size=1, max_size=4))
    adv = draw(st.lists(st.sampled_from([-1.5, -0.3, 0.0, 0.4, 2.0]), min_size=len(rows), max_size=len(rows)))
    old = torch.tensor([[t[0] for t in r] for r in rows], dtype=torch.float64)
    new = (old + torch.tensor([[t[1] for t in r] for r in rows], dtype=torch.float64)).clamp(max=0.0)
    mask = torch.tensor([[t[2] for t in r] for r in rows])
    return old, new, torch.tensor(adv, dtype=torch.float64)[:, None].expand_as(old), mask


PARAMS = st.fixed_dictionaries(
    {
        "w_min": st.floats(0.1, 1.0),
        "delta_b_quantile": st.one_of(st.none(), st.floats(0.0, 1.0)),
        "position_horizon": st.one_of(st.none(), st.integers(1, 20)),
        "prefix_budget": st.booleans(),
        "divergence": st.sampled_from(["binary_tv", "binary_kl"]),
    }
)


def _masked(batch, **params):
    return cppo_token_losses(*batch, LossParams(**params)).gate.masked


@settings(max_examples=150, deadline=None)
@given(batches(), PARAMS, st.floats(0.01, 0.5), st.floats(1.0, 3.0))
def test_raising_delta_never_masks_more(batch, params, delta, factor):
    low, high = _masked(batch, delta=delta, **params), _masked(batch, delta=delta * factor, **params)
    assert not (high & ~low).any()


@settings(max_examples=150, deadline=None)
@given(batches(), PARAMS, st.floats(0.0, 0.1), st.floats(1.0, 4.0))
def test_raising_delta_b_never_masks_more(batch, params, delta_b, factor):
    low, high = _masked(batch, delta_b=delta_b, **params), _masked(batch, delta_b=delta_b * factor, **params)
    assert not (high & ~low).any()


@settings(max_examples=150, deadline=None)
@given(batches(), PARAMS, st.sampled_from(["hard", "soft"]))
def test_tokens_moving_toward_mu_are_never_masked(batch, params, gate):
    terms = cppo_token_losses(*batch, LossParams(gate=gate, **params))
    old, new, adv, mask = batch
    toward = adv * (new - old) <= 0
    assert not (terms.gate.masked & toward).any()
    assert (terms.gate.weight[toward & mask] == 1).all()


@settings(max_examples=150, deadline=None)
@given(batches(), PARAMS, st.floats(0.01, 0.5))
def test_first_token_threshold_is_delta(batch, params, delta):
    old, new, adv, mask = batch
    terms = cppo_token_losses(old, new, adv, mask, LossParams(delta=delta, **params))
    away = adv * (terms.rho - 1) > 0
    first = mask[:, 0]
    assert (terms.gate.masked[first, 0] == (away & (terms.div > delta))[first, 0]).all()


@settings(max_examples=150, deadline=None)
@given(batches(), PARAMS)
def test_soft_gate_weights_in_unit_interval_and_one_where_hard_keeps(batch, params):
    hard = cppo_token_losses(*batch, LossParams(gate="hard", **params)).gate
    soft = cppo_token_losses(*batch, LossParams(gate="soft", **params)).gate
    assert ((soft.weight >= 0) & (soft.weight <= 1)).all()
    assert (soft.weight[hard.weight == 1] == 1).all()
    assert (soft.masked == hard.masked).all()
    assert (soft.weight[~batch[3]] == 0).all()
