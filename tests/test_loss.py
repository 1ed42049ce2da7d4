"""The registered `cppo` loss: loss and gradient against the float64 reference, verl's dppo_tv special case,
and the real call path through verl.workers.utils.losses.ppo_loss with nested engine outputs."""

import pytest
import torch
from verl.workers.utils.losses import ppo_loss

from tests.support.loss_call import call_loss
from tests.support.reference import RefParams, random_case, reference_loss_and_grad
from tests.support.verl_inputs import AGG_MODES, actor_config, engine_micro_batch
from verl_cppo.core.divergence import BINARY_DIVERGENCES
from verl_cppo.loss import METRIC_KEYS

SETTINGS = [
    {},
    {"delta_b_quantile": None, "delta_b": 0.015},
    {"position_horizon": 40, "gate": "soft"},
    {"divergence": "binary_kl", "delta": 0.05, "ratio_cap": 2.0},
]


def _cppo(old, new, adv, mask, cfg, **kw):
    return call_loss(old, new, adv, mask, cfg.loss_agg_mode, cfg, **kw)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_loss_and_gradient_match_reference(mode, setting, gen):
    old, new, adv, mask = random_case(gen, batch=6, width=29, spread=0.5)
    # Called directly (no ppo_loss), global_batch_info is empty: local counts, and the padded width as the
    # seq-mean-token-sum-norm horizon, exactly as for verl's built-in losses.
    loss, grad, metrics = _cppo(old, new, adv, mask, actor_config(mode, cppo=setting))
    ref_loss, ref_grad, ref = reference_loss_and_grad(old, new, adv, mask, RefParams(**setting), mode)
    tol = 1e-7 if mode == "seq-mean-token-mean" else 1e-12  # verl adds 1e-8 to per-sequence token counts
    assert loss.item() == pytest.approx(ref_loss, rel=tol, abs=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=1e-14)
    n_masked = sum(map(sum, ref.masked))
    assert metrics["actor/cppo_masked_frac"] == pytest.approx(n_masked / int(mask.sum()))
    assert 0 < n_masked < int(mask.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("with_is_weights", [False, True])
def test_w_min_1_without_budget_is_verl_dppo_tv(dtype, mode, with_is_weights, gen):
    old, new, adv, mask = random_case(gen, batch=8, width=33, spread=0.6)
    old, new, adv = old.to(dtype), new.to(dtype), adv.to(dtype)
    is_weights = torch.rand(old.shape, generator=gen, dtype=dtype) * 2 if with_is_weights else None
    delta = 0.2
    cppo_cfg = actor_config(mode, cppo={"w_min": 1.0, "prefix_budget": False, "delta": delta, "ratio_cap": 5.0})
    dppo_cfg = actor_config(mode, loss_mode="dppo_tv", clip_ratio_low=delta, clip_ratio_high=delta, clip_ratio_c=5.0)
    results = []
    for cfg in (cppo_cfg, dppo_cfg):
        loss, grad, _ = call_loss(old, new, adv, mask, mode, cfg, rollout_is_weights=is_weights)
        results.append((loss, grad))
    (cppo_loss, cppo_grad), (dppo_loss, dppo_grad) = results
    assert cppo_loss.dtype == dppo_loss.dtype
    assert (cppo_grad != 0).any()
    torch.testing.assert_close(cppo_loss, dppo_loss, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)
    torch.testing.assert_close(cppo_grad, dppo_grad, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=1e-30)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_through_verl_ppo_loss_with_nested_engine_outputs(mode, gen):
    """verl's ppo_loss pads the engine's nested log-probs, fills global_batch_info and calls us by name."""
    old, new, adv, mask = random_case(gen, batch=5, width=21, holes=0.1, spread=0.5)
    mask[:, 0] = True  # every response has at least one token, as the engine guarantees
    setting = {"delta_b_quantile": 0.8}
    cfg = actor_config(mode, cppo=setting, loss_scale_factor=32 if mode == "seq-mean-token-sum-norm" else None)
    model_output, data, values, resp_lens = engine_micro_batch(old, new, adv, mask, prompt_lens=[3, 1, 4, 2, 5])
    loss, metrics = ppo_loss(cfg, model_output, data)
    loss.backward()
    # The engine pads responses to the micro-batch's longest response, not to our width.
    width = max(resp_lens)
    ref_loss, ref_grad, _ = reference_loss_and_grad(
        old[:, :width],
        new[:, :width],
        adv[:, :width],
        mask[:, :width],
        RefParams(**setting),
        mode,
        loss_scale_factor=cfg.loss_scale_factor,
    )
    tol = 1e-7 if mode == "seq-mean-token-mean" else 1e-12
    assert loss.item() == pytest.approx(ref_loss, rel=tol)
    offset = 0
    for b, (p, r) in enumerate(zip([3, 1, 4, 2, 5], resp_lens)):
        row = values.grad[offset : offset + p + r]
        torch.testing.assert_close(row[p - 1 : p - 1 + r], ref_grad[b, :r], rtol=tol, atol=1e-14)
        assert (row[: p - 1] == 0).all() and (row[p - 1 + r :] == 0).all()
        offset += p + r
    assert set(METRIC_KEYS) <= set(metrics)
    assert metrics["actor/pg_loss"].values[0] == pytest.approx(loss.item())


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batch_split_does_not_change_the_global_loss(mode, gen):
    """With verl's global batch info the summed micro-batch losses equal the whole-batch loss; the mask of a
    response does not depend on which responses share its micro-batch (H is the response's own length)."""
    old, new, adv, mask = random_case(gen, batch=6, width=25, spread=0.5)
    mask[:, 0] = True
    mask[0, :] = True  # the longest response sits in the first micro-batch only
    cfg = actor_config(mode, cppo={}, loss_scale_factor=25)
    prompt_lens = [2] * 6
    kw = {"global_tokens": int(mask.sum()), "global_seqs": 6}
    whole, _ = ppo_loss(cfg, *engine_micro_batch(old, new, adv, mask, prompt_lens, **kw)[:2])
    parts = sum(
        ppo_loss(cfg, *engine_micro_batch(old[s], new[s], adv[s], mask[s], prompt_lens[:3], **kw)[:2])[0]
        for s in (slice(0, 3), slice(3, 6))
    )
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-14)


def test_same_metric_keys_on_every_call(gen):
    cfg = actor_config("token-mean", cppo={})
    old, new, adv, mask = random_case(gen, batch=3, width=9)
    keys = []
    for m in (mask, torch.zeros_like(mask), torch.ones_like(mask)):
        _, _, metrics = _cppo(old, new, adv, m, cfg)
        keys.append(tuple(metrics))
        assert all(isinstance(v, float) for v in metrics.values())
    assert keys[0] == keys[1] == keys[2] == METRIC_KEYS


def test_plain_policy_loss_config_uses_paper_defaults(gen):
    """loss_mode=cppo on verl's stock PolicyLossConfig runs with CPPOConfig() defaults."""
    old, new, adv, mask = random_case(gen, batch=6, width=29, spread=0.5)
    plain = _cppo(old, new, adv, mask, actor_config("token-mean"))
    explicit = _cppo(old, new, adv, mask, actor_config("token-mean", cppo={}))
    ref_loss, ref_grad, _ = reference_loss_and_grad(old, new, adv, mask, RefParams(), "token-mean")
    assert plain[0].item() == explicit[0].item() == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(plain[1], ref_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("divergence", BINARY_DIVERGENCES)
@pytest.mark.parametrize("value", [0.5, 88.8, 1e30])
def test_no_metric_of_the_loss_is_non_finite(divergence, value):
    """The registered loss, called as verl calls it, on log-probs above 0: every metric is finite."""
    gen = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 6, generator=gen, dtype=torch.float64)
    new = old + 0.01 * torch.randn(3, 6, generator=gen, dtype=torch.float64)
    old[0, 1], new[1, 2], old[2, 0], new[2, 0] = value, value, value, value
    adv = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    config = actor_config(cppo={"divergence": divergence})
    out = call_loss(old, new, adv, mask, "token-mean", config)
    assert torch.isfinite(out.loss) and torch.isfinite(out.grad).all()
    for key, metric in out.metrics.items():
        values = torch.as_tensor(metric, dtype=torch.float64)
        assert torch.isfinite(values).all(), (key, metric)
