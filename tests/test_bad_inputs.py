"""Hostile inputs: the loss and its gradient stay finite, and masked tokens get exactly zero gradient."""

import math

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from tests.support.loss_call import call_loss
from tests.support.reference import random_case
from tests.support.verl_inputs import AGG_MODES, actor_config
from verl_cppo.config import CPPOConfig
from verl_cppo.core.token_loss import cppo_token_losses

CPPO = get_policy_loss_fn("cppo")


def _run(old, new, adv, mask, mode, is_weights=None, **cppo):
    loss, grad, metrics = call_loss(
        old, new, adv, mask, mode, actor_config(mode, cppo=cppo), rollout_is_weights=is_weights
    )
    assert torch.isfinite(loss) and loss.dim() == 0
    assert torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
    return loss, grad, metrics


def _kept(old, new, adv, mask, is_weights=None, **cppo):
    terms = cppo_token_losses(old, new, adv, mask, CPPOConfig(**cppo), is_weights)
    return terms.gate.weight > 0


CORRUPTIONS = {
    "nan_log_prob": ("new", float("nan")),
    "posinf_log_prob": ("new", float("inf")),
    "neginf_log_prob": ("new", float("-inf")),
    "nan_old_log_prob": ("old", float("nan")),
    "neginf_old_log_prob": ("old", float("-inf")),
    "nan_advantage": ("adv", float("nan")),
    "inf_advantage": ("adv", float("inf")),
}


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_non_finite_inputs_are_masked_with_zero_gradient(mode, corruption, gen):
    old, new, adv, mask = random_case(gen, batch=5, width=17, holes=0.0, spread=0.3)
    mask[:, :10] = True
    name, value = CORRUPTIONS[corruption]
    tensors = {"old": old, "new": new, "adv": adv}
    tensors[name] = tensors[name].clone()
    tensors[name][1, 3] = value
    tensors[name][4, 0] = value
    tensors[name][2, 15] = value  # also where the response mask may be off
    _, grad, metrics = _run(tensors["old"], tensors["new"], tensors["adv"], mask, mode)
    assert grad[1, 3] == 0 and grad[4, 0] == 0
    kept = _kept(tensors["old"], tensors["new"], tensors["adv"], mask)
    assert (grad[~kept] == 0).all()
    assert metrics["actor/cppo_nonfinite_frac"] > 0


def test_non_finite_is_weights_are_masked(gen):
    old, new, adv, mask = random_case(gen, batch=4, width=12, holes=0.0)
    mask[:, :6] = True
    weights = torch.rand(old.shape, generator=gen, dtype=old.dtype)
    weights[0, 2] = float("nan")
    weights[3, 1] = float("inf")
    _, grad, metrics = _run(old, new, adv, mask, "token-mean", is_weights=weights)
    assert grad[0, 2] == 0 and grad[3, 1] == 0
    assert metrics["actor/cppo_nonfinite_frac"] == pytest.approx(2 / int(mask.sum()))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_log_ratios_beyond_20_are_clamped_and_truncated(mode, gen):
    old, new, adv, mask = random_case(gen, batch=4, width=10, holes=0.0)
    mask[:, :5] = True
    old[0, :3] = -60.0  # log pi - log mu = +~60: ratio exp(20) before the cap
    new[1, :3] = -70.0  # -~70: ratio exp(-20)
    _, grad, metrics = _run(old, new, adv, mask, mode)
    assert metrics["actor/cppo_rho_max"] == pytest.approx(math.exp(20.0))
    assert metrics["actor/cppo_ratio_truncated_frac"] > 0
    kept = _kept(old, new, adv, mask)
    assert (grad[~kept] == 0).all()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_bf16_inputs(mode, gen):
    old, new, adv, mask = random_case(gen, batch=4, width=64, spread=0.3)
    old, new, adv = old.bfloat16(), new.bfloat16(), adv.bfloat16()
    loss, grad, _ = _run(old, new, adv, mask, mode)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    ref, _, _ = _run(old.float(), new.float(), adv.float(), mask, mode)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)  # same values, computed in fp32


@pytest.mark.parametrize("mode", AGG_MODES)
def test_empty_rows_length_one_responses_and_all_masked_batches(mode, gen):
    old, new, adv, mask = random_case(gen, batch=5, width=8, holes=0.0, spread=1.0)
    mask[:] = False
    mask[1, 0] = True  # length-1 response
    mask[3, :8] = True
    loss, grad, _ = _run(old, new, adv, mask, mode)  # rows 0, 2, 4 are empty
    assert (grad[[0, 2, 4]] == 0).all()
    loss, grad, metrics = _run(old, new, adv, torch.zeros_like(mask), mode)  # an all-masked micro-batch
    assert loss.item() == 0 and (grad == 0).all()
    assert metrics["actor/cppo_masked_frac"] == 0 and metrics["actor/cppo_delta_b_mean"] == 0


def test_length_one_response_gets_the_full_delta(gen):
    old = torch.log(torch.tensor([[0.30], [0.30]], dtype=torch.float64))
    new = torch.log(torch.tensor([[0.44], [0.46]], dtype=torch.float64))  # D = 0.14 and 0.16, delta = 0.15
    adv = torch.ones_like(old)
    kept = _kept(old, new, adv, torch.ones_like(old, dtype=torch.bool))
    assert kept[:, 0].tolist() == [True, False]


@pytest.mark.parametrize("mode", AGG_MODES)
def test_all_zero_advantages(mode, gen):
    old, new, adv, mask = random_case(gen, batch=4, width=12, spread=2.0)
    loss, grad, metrics = _run(old, new, torch.zeros_like(adv), mask, mode)
    assert loss.item() == 0 and (grad == 0).all()
    assert metrics["actor/cppo_masked_frac"] == 0  # A = 0 counts as moving toward mu


def test_shape_mismatch_names_the_tensor(gen):
    old, new, adv, mask = random_case(gen, batch=3, width=6)
    with pytest.raises(ValueError, match=r"advantages has shape \(3, 5\)"):
        CPPO(
            old_log_prob=old,
            log_prob=new,
            advantages=adv[:, :5],
            response_mask=mask,
            loss_agg_mode="token-mean",
            config=actor_config(),
        )
