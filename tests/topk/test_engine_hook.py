"""The engine hook and the loss with a Top-K divergence, against the float64 full-vocabulary reference.

The hook is called as verl's FSDP engine calls it (packed logits of the micro-batch, ``student_logits=``), its
output is wrapped into a nested tensor over the packed stream as the engine does, and the loss call goes through
verl's real ``ppo_loss`` and ``no_padding_2_padding``.
"""

import pytest
import torch
from verl.workers.utils.losses import ppo_loss

from tests.support.float32_bounds import UNIT_ROUNDOFF
from tests.support.reference import RefParams, reference_loss_and_grad
from tests.support.topk_batches import (
    legacy_micro_batch,
    pi_log_probs_nested,
    ref_divergence_bounds,
    ref_divergences,
    topk_micro_batch,
)
from tests.support.verl_inputs import AGG_MODES, actor_config
from verl_cppo.loss import METRIC_KEYS
from verl_cppo.topk.channel import TopKDataMissing
from verl_cppo.topk.engine_hook import TOPK_COVERAGE_METRIC, TOPK_DIV_KEY, full_sequence_topk_inputs, ppo_loss_with_topk

PROMPTS, RESPONSES = [3, 1, 5, 2], [6, 9, 1, 7]


def _hook(cfg, data, pi_logits):
    """What FSDPEngineWithLMHead.prepare_model_outputs does with the hook's output (no SP)."""
    out = ppo_loss_with_topk(cfg, student_logits=pi_logits.float().unsqueeze(0), data=data)
    div = out[TOPK_DIV_KEY]
    assert div.shape == (1, pi_logits.shape[0]) and div.dtype == torch.float32 and not div.requires_grad
    return torch.nested.nested_tensor_from_jagged(div.squeeze(0), offsets=data["input_ids"].offsets())


@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_hook_places_d_on_the_rows_that_predict_each_response_token(kind, gen):
    data, pi_logits, ref = topk_micro_batch(gen, PROMPTS, RESPONSES)
    cfg = actor_config(cppo={"divergence": f"topk_{kind}", "topk": 5})
    div = _hook(cfg, data, pi_logits)
    expected = ref_divergences(ref, kind)
    # no_padding_2_padding is how ppo_loss cuts the responses out of the engine's per-token outputs
    from verl.workers.utils.padding import no_padding_2_padding

    rows = no_padding_2_padding(div, data)
    width = max(RESPONSES)
    # the hook's D is float32 from float32 logits: within topk_divergence_bound of the float64 reference (3e-6
    # to 7e-6 here: R + V + 1 ~ 60 roundings of the log-sum-exp), 2x for the worst case's constants. A token read
    # from the wrong row or a wrong mass moves D by ~0.1.
    bound = 2 * ref_divergence_bounds(ref, kind, expected)  # [B, T]
    for b, r in enumerate(RESPONSES):
        gap = (rows[b, :r].double() - expected[b, :r]).abs()
        assert (gap <= bound[b, :r]).all(), (b, gap.tolist(), bound[b, :r].tolist())
        assert (rows[b, r:] == 0).all()
    assert rows.shape == (len(RESPONSES), width)
    # rows of prompt tokens and of each sequence's last token carry no divergence
    values, offsets = div.values(), data["input_ids"].offsets().tolist()
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        seq = values[offsets[b] : offsets[b + 1]]
        assert (seq[: p - 1] == 0).all() and seq[p - 1 + r :].eq(0).all()
    # sampled tokens inside and outside mu's top-K are both exercised
    inside = [e[1] in e[2] for row in ref["rows"] for e in row if e is not None]
    assert any(inside) and not all(inside)


def test_full_sequence_layout_is_the_one_log_probs_use(gen):
    data, _, _ = topk_micro_batch(gen, PROMPTS, RESPONSES, k=3)
    inputs = full_sequence_topk_inputs(data)
    ids, offsets = data["input_ids"].values(), data["input_ids"].offsets().tolist()
    flag = inputs["is_response"].values()
    assert int(flag.sum()) == sum(RESPONSES)
    # wherever the flag is set, the token being predicted (the next input id) is the sampled token
    labels = torch.roll(ids, -1)
    torch.testing.assert_close(inputs["sampled"].values()[flag], labels[flag])
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        seq_flag = flag[offsets[b] : offsets[b + 1]]
        assert seq_flag.tolist() == [False] * (p - 1) + [True] * r + [False]
        torch.testing.assert_close(
            inputs["ids"].values()[offsets[b] + p - 1 : offsets[b] + p - 1 + r],
            data["rollout_topk_ids"][b].long(),
        )
    assert (inputs["ids"].values()[~flag] == -1).all()


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_loss_through_ppo_loss_matches_reference(kind, mode, gen):
    data, pi_logits, ref = topk_micro_batch(gen, PROMPTS, RESPONSES, spread=0.5)
    setting = {"divergence": f"topk_{kind}", "topk": 5, "delta": 0.2, "delta_b": 0.03}
    cfg = actor_config(mode, cppo=setting, loss_scale_factor=16 if mode == "seq-mean-token-sum-norm" else None)
    log_probs, leaf = pi_log_probs_nested(data, pi_logits)
    model_output = {"log_probs": log_probs, TOPK_DIV_KEY: _hook(cfg, data, pi_logits)}
    loss, metrics = ppo_loss_with_topk(cfg, model_output=model_output, data=data)
    loss.backward()
    divs = ref_divergences(ref, kind)
    ref_params = RefParams(**{k: v for k, v in setting.items() if k != "topk"})
    ref_loss, ref_grad, res = reference_loss_and_grad(
        ref["old"], ref["new"], ref["adv"], ref["mask"], ref_params, mode,
        loss_scale_factor=cfg.loss_scale_factor, divergences=divs,
    )  # fmt: skip
    # The loss runs in float64 (pi's log-probs are float64); it differs from the reference only in log mu, which
    # reaches it through float32 (mu's sampled log-prob, rounded: |d log mu| <= u |log mu|), so each token's
    # coefficient sg(min(rho, cap)) A M / N moves by a relative u |log mu| (D enters only through the hard
    # gate's comparisons, which agree: masked_frac below). Gradient: that relative bound per token; loss, a sum
    # of signed terms coef_t log pi_t: that bound times sum |coef_t log pi_t|. 2x margin on both; a wrong
    # coefficient (a token's A, rho or normaliser) moves them by far more than 1e-6 relative.
    rtol = 2 * UNIT_ROUNDOFF * float(ref["old"][ref["mask"]].abs().max())  # 2 x u max |log mu|
    abs_loss = float((ref_grad * ref["new"]).abs().sum())  # sum |coef_t log pi_t|
    assert loss.item() == pytest.approx(ref_loss, rel=0, abs=rtol * abs_loss + 1e-14)
    offsets = data["input_ids"].offsets().tolist()
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        grad = leaf.grad[offsets[b] + p - 1 : offsets[b] + p - 1 + r]
        torch.testing.assert_close(grad, ref_grad[b, :r], rtol=rtol, atol=1e-14)
    n_masked = sum(map(sum, res.masked))
    assert metrics["actor/cppo_masked_frac"].values[0] == pytest.approx(n_masked / int(ref["mask"].sum()))
    assert 0 < n_masked < int(ref["mask"].sum())
    # mean of the float32 D over the n valid tokens: each within its bound (as in the test above), and the float32
    # sum of n non-negative terms within n u of itself; 2x margin. A D from a wrong row moves it by ~1e-2.
    n_valid = int(ref["mask"].sum())
    div_mean = float(divs[ref["mask"]].mean())
    div_tol = float(ref_divergence_bounds(ref, kind, divs)[ref["mask"]].mean()) + n_valid * UNIT_ROUNDOFF * div_mean
    assert metrics["actor/cppo_div_mean"].values[0] == pytest.approx(div_mean, rel=0, abs=2 * div_tol)
    assert set(METRIC_KEYS) <= set(metrics)
    assert metrics[TOPK_COVERAGE_METRIC].values[0] == 1.0


def test_topk_coverage_counts_tokens_without_a_full_row(gen):
    data, pi_logits, _ = topk_micro_batch(gen, PROMPTS, RESPONSES)
    cfg = actor_config(cppo={"divergence": "topk_tv", "topk": 5})
    ids = data["rollout_topk_ids"].values()  # [sum R, K], a view of the nested field
    ids[:2] = -1  # two tokens lost their whole row
    ids[5, -1] = -1  # one lost its last entry
    log_probs, _ = pi_log_probs_nested(data, pi_logits)
    _, metrics = ppo_loss_with_topk(cfg, {"log_probs": log_probs, TOPK_DIV_KEY: _hook(cfg, data, pi_logits)}, data)
    assert metrics[TOPK_COVERAGE_METRIC].values[0] == pytest.approx(1 - 3 / sum(RESPONSES))


@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_the_legacy_trainers_padded_batch_gives_the_same_d_loss_and_coverage(kind, gen):
    """The legacy trainer's micro-batch (padded response fields, verl's left_right_2_no_padding) against the v1
    trainer's nested one of the same responses: the same operations on the same values, so equal bit for bit."""
    data, pi_logits, ref = topk_micro_batch(gen, PROMPTS, RESPONSES)
    data["rollout_topk_ids"].values()[3] = -1  # one token without its row: coverage < 1 in both layouts
    legacy = legacy_micro_batch(data)
    assert not legacy["responses"].is_nested and legacy["rollout_topk_ids"].shape == (4, max(RESPONSES), 5)
    assert torch.equal(legacy["input_ids"].offsets(), data["input_ids"].offsets())  # the same packed stream
    cfg = actor_config(cppo={"divergence": f"topk_{kind}", "topk": 5})
    div_v1, div_legacy = _hook(cfg, data, pi_logits), _hook(cfg, legacy, pi_logits)
    assert torch.equal(div_legacy.values(), div_v1.values())
    from verl.workers.utils.padding import no_padding_2_padding

    rows, expected = no_padding_2_padding(div_legacy, legacy), ref_divergences(ref, kind)
    bound = 2 * ref_divergence_bounds(ref, kind, expected)  # as in the first test: the float32 D's bound
    full = torch.ones_like(bound, dtype=torch.bool)
    full[0, 3] = False  # the emptied row: D spans {sampled, other} only, not the reference's top-K
    assert ((rows.double() - expected).abs() <= bound)[full].all() and rows[3, RESPONSES[3] :].eq(0).all()
    log_probs, _ = pi_log_probs_nested(data, pi_logits)
    loss_v1, metrics_v1 = ppo_loss_with_topk(cfg, {"log_probs": log_probs, TOPK_DIV_KEY: div_v1}, data)
    loss_legacy, metrics_legacy = ppo_loss_with_topk(cfg, {"log_probs": log_probs, TOPK_DIV_KEY: div_legacy}, legacy)
    assert loss_legacy.item() == loss_v1.item()
    for key in (TOPK_COVERAGE_METRIC, "actor/cppo_div_mean", "actor/cppo_masked_frac"):
        assert metrics_legacy[key].values == metrics_v1[key].values, key
    assert metrics_legacy[TOPK_COVERAGE_METRIC].values[0] == pytest.approx(1 - 1 / sum(RESPONSES))


def test_a_padded_field_shorter_than_its_responses_is_refused(gen):
    data, pi_logits, _ = topk_micro_batch(gen, PROMPTS, RESPONSES)
    legacy = legacy_micro_batch(data)
    legacy["rollout_topk_log_probs"] = legacy["rollout_topk_log_probs"][:, :-1]
    cfg = actor_config(cppo={"divergence": "topk_tv", "topk": 5})
    with pytest.raises(ValueError, match=r"rollout_topk_log_probs has shape \(4, 8, 5\), responses \[6, 9, 1, 7\]"):
        ppo_loss_with_topk(cfg, student_logits=pi_logits.float()[None], data=legacy)


def test_topk_divergence_keyword_equals_the_engine_channel(gen):
    data, pi_logits, ref = topk_micro_batch(gen, PROMPTS, RESPONSES)
    cfg = actor_config(cppo={"divergence": "topk_tv", "topk": 5})
    log_probs, _ = pi_log_probs_nested(data, pi_logits)
    via_engine, _ = ppo_loss_with_topk(cfg, {"log_probs": log_probs, TOPK_DIV_KEY: _hook(cfg, data, pi_logits)}, data)
    direct, _ = _registered_cppo(ref, cfg, topk_divergence=ref_divergences(ref, "tv"))
    # Both float64 losses (D enters only through the hard gate); the engine's log mu went through float32
    # (|d log mu| <= u |log mu|), moving each term M sg(min(rho, cap)) A log pi / N by that relative amount:
    # |d loss| <= u max |log mu| sum_t |A_t| min(rho_t, cap) |log pi_t| / N (M <= 1, token-mean), 2x margin.
    mask, cap = ref["mask"], cfg.policy_loss.cppo.ratio_cap
    rho = (ref["new"] - ref["old"]).exp().clamp(max=cap)[mask]
    scale = float((ref["adv"][mask].abs() * rho * ref["new"][mask].abs()).sum()) / int(mask.sum())
    tol = 2 * UNIT_ROUNDOFF * float(ref["old"][mask].abs().max()) * scale
    assert via_engine.item() == pytest.approx(direct.item(), rel=0, abs=tol + 1e-14)


def test_missing_topk_data_fails_with_a_clear_error(gen):
    data, pi_logits, _ = topk_micro_batch(gen, PROMPTS, RESPONSES)
    cfg = actor_config(cppo={"divergence": "topk_kl"})
    log_probs, _ = pi_log_probs_nested(data, pi_logits)
    # the loss without the engine's D (the hook never ran): names the missing input and how to enable it
    with pytest.raises(TopKDataMissing, match=r"divergence='topk_kl' needs the per-token Top-K divergence.*README"):
        ppo_loss(cfg, {"log_probs": log_probs}, data)
    with pytest.raises(TopKDataMissing):
        ppo_loss_with_topk(cfg, {"log_probs": log_probs}, data)
    # the hook on a batch whose rollout returned no top-K
    del data["rollout_topk_ids"]
    with pytest.raises(RuntimeError, match=r"lacks \['rollout_topk_ids'\].*VERL_CPPO_TOPK"):
        ppo_loss_with_topk(cfg, student_logits=pi_logits.float()[None], data=data)


def test_hook_refuses_a_binary_divergence(gen):
    data, pi_logits, _ = topk_micro_batch(gen, PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match=r"divergence='binary_tv' is not one of \('topk_tv', 'topk_kl'\)"):
        ppo_loss_with_topk(actor_config(cppo={}), student_logits=pi_logits.float()[None], data=data)


def test_binary_divergence_path_is_untouched_by_the_wrapper(gen):
    """Without the engine's D, ppo_loss_with_topk is verl's ppo_loss."""
    data, pi_logits, _ = topk_micro_batch(gen, PROMPTS, RESPONSES)
    cfg = actor_config(cppo={})
    log_probs, _ = pi_log_probs_nested(data, pi_logits)
    ours, _ = ppo_loss_with_topk(cfg, {"log_probs": log_probs}, data)
    verls, _ = ppo_loss(cfg, {"log_probs": log_probs}, data)
    assert ours.item() == verls.item()


def _registered_cppo(ref, cfg, topk_divergence):
    """The registered ``cppo`` loss called directly on the reference rows, D by keyword (token-mean)."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    return get_policy_loss_fn("cppo")(
        old_log_prob=ref["old"],
        log_prob=ref["new"],
        advantages=ref["adv"],
        response_mask=ref["mask"],
        loss_agg_mode="token-mean",
        config=cfg,
        topk_divergence=topk_divergence,
    )


def test_misaligned_or_nonfinite_divergence(gen):
    _, _, ref = topk_micro_batch(gen, PROMPTS, RESPONSES)
    cfg = actor_config(cppo={"divergence": "topk_kl"})
    with pytest.raises(ValueError, match=r"topk_divergence has shape \(4, 8\), log_prob has \(4, 9\)"):
        _registered_cppo(ref, cfg, torch.zeros(4, 8))
    div = ref_divergences(ref, "kl")
    first = ref["mask"].nonzero()[0].tolist()
    div[tuple(first)] = float("inf")  # pi gives ~0 mass where mu has some: a huge KL, capped, not dropped
    loss, metrics = _registered_cppo(ref, cfg, div)
    assert torch.isfinite(loss) and metrics["actor/cppo_nonfinite_frac"] == 0.0
    div[tuple(first)] = float("nan")  # missing data: the token is dropped and counted
    loss, metrics = _registered_cppo(ref, cfg, div)
    assert torch.isfinite(loss) and metrics["actor/cppo_nonfinite_frac"] == pytest.approx(1 / int(ref["mask"].sum()))
