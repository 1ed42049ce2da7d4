"""Hostile inputs: the loss, its gradient VALUES and its metrics against the float64 loop reference.

Every setting (each divergence, both gates, each ablation, fixed delta_b) sees one micro-batch holding every
kind of bad value on response tokens (NaN / +-inf log-probs and old log-probs, +-inf / NaN advantages and IS
weights, log-ratios of +-1000, log-probs of 0 and -1e4, Top-K D that is missing, +inf or huge) and off them.
``tests/support/reference.py`` drops a token with a non-finite input, caps D and aggregates with verl's
semantics on its own. Then dtypes (fp16, bf16, float64, mixed), strided / expanded tensors, B = 0 and T = 0,
int / float masks, shapes the loss refuses, and verl's global counts (explicit, 0, dp_size > 1) for both
kinds of rows the loss aggregates (gathered rows and shard-local rows).
"""

import math
import re

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from tests.support.loss_call import call_loss
from tests.support.reference import RefParams, random_case, reference_loss_and_grad
from tests.support.verl_inputs import AGG_MODES, actor_config
from verl_cppo.core.mask import response_lengths, shuffled_positions
from verl_cppo.sharding.context import ShardContext
from verl_cppo.sharding.layout import single_rank_layout

CPPO = get_policy_loss_fn("cppo")
INF, NAN = math.inf, math.nan

SETTINGS = {
    "binary_tv": {},
    "binary_kl": {"divergence": "binary_kl"},
    "topk_tv": {"divergence": "topk_tv"},
    "topk_kl": {"divergence": "topk_kl"},
    "soft_gate": {"gate": "soft"},
    "soft_gate_no_budget": {"gate": "soft", "prefix_budget": False},
    "no_position_weight": {"position_weight": False},
    "no_prefix_budget": {"prefix_budget": False},
    "fixed_delta_b": {"delta_b_quantile": None, "delta_b": 0.015},
    "fixed_horizon": {"position_horizon": 7, "w_min": 0.6},
    "shuffle_positions": {"shuffle_positions": True},
}


def hostile_case(gen, batch=7, width=12):
    """(old, new, adv, mask, is_weights, topk D, number of response tokens with a bad input)."""
    old, new, adv, mask = random_case(gen, batch=batch, width=width, holes=0.1, spread=0.4)
    mask[:, :8] = True
    mask[6] = False  # an empty response ...
    new[6, :3] = NAN  # ... with garbage under it
    isw = torch.rand(old.shape, generator=gen, dtype=old.dtype) * 2
    div = torch.rand(old.shape, generator=gen, dtype=old.dtype) * 0.3
    bad = [
        (new, 0, 1, NAN), (new, 0, 2, INF), (new, 0, 3, -INF),
        (old, 1, 1, INF), (old, 1, 2, NAN), (old, 1, 3, -INF),
        (adv, 2, 4, -INF), (adv, 2, 5, INF), (adv, 2, 6, NAN),
        (isw, 5, 1, -INF), (isw, 5, 2, NAN), (isw, 5, 3, INF),
        (div, 4, 6, NAN),  # a Top-K D the engine could not compute: dropped (Top-K settings only)
    ]  # fmt: skip
    for tensor, b, t, value in bad:
        tensor[b, t] = value
    old[3, 0], new[3, 0] = -1000.0, 0.0  # log-ratio +1000 (clamped to 20)
    old[3, 1], new[3, 1] = 0.0, -1000.0  # log-ratio -1000
    new[4, 2], new[4, 3], old[4, 4] = 0.0, -1e4, -1e4  # pi = 1; pi and mu ~ 0
    div[4, 0], div[4, 1] = INF, 1e30  # capped at 1e4 (binary KL's cap)
    new[5, width - 1], mask[5, width - 1] = NAN, False  # a bad value off the response mask
    return old, new, adv, mask, isw, div, len(bad) - 1


def _check_against_reference(setting, mode, old, new, adv, mask, isw, div, **kw):
    topk = setting.get("divergence", "").startswith("topk")
    params = RefParams(**{k: v for k, v in setting.items() if k != "shuffle_positions"})
    positions = None
    if setting.get("shuffle_positions"):
        torch.manual_seed(7)  # the loss draws its permutation from the global generator
        positions = shuffled_positions(response_lengths(mask.double()), mask.shape[-1])
        torch.manual_seed(7)
    extra = {"topk_divergence": div} if topk else {}
    loss, grad, metrics = call_loss(
        old, new, adv, mask, mode, actor_config(mode, cppo=setting), rollout_is_weights=isw, **extra
    )
    ref_loss, ref_grad, _ = reference_loss_and_grad(
        old, new, adv, mask, params, mode, positions=positions, divergences=div if topk else None, is_weights=isw
    )
    assert math.isfinite(loss.item()) and torch.isfinite(grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
    assert loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-9, atol=1e-12)
    return metrics


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_gradient_values_under_bad_inputs_match_the_float64_reference(name, mode, gen):
    old, new, adv, mask, isw, div, n_bad = hostile_case(gen)
    setting = SETTINGS[name]
    metrics = _check_against_reference(setting, mode, old, new, adv, mask, isw, div)
    n_bad += 1 if setting.get("divergence", "").startswith("topk") else 0
    assert metrics["actor/cppo_nonfinite_frac"] == pytest.approx(n_bad / int(mask.sum()))
    assert metrics["actor/cppo_rho_max"] == pytest.approx(math.exp(20.0))  # the +1000 log-ratio, clamped


@pytest.mark.parametrize("mode", AGG_MODES)
def test_the_reference_agrees_without_is_weights(mode, gen):
    old, new, adv, mask, _, div, _ = hostile_case(gen)
    _check_against_reference({}, mode, old, new, adv, mask, None, div)


DTYPES = {
    "fp16": (torch.float16, torch.float16, torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "float64": (torch.float64, torch.float64, torch.float64, torch.float64),
    "mixed": (torch.float64, torch.float16, torch.float32, torch.bfloat16),  # old, new, adv, IS weights
}


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("dtypes", sorted(DTYPES))
def test_dtypes_against_the_reference_on_the_same_values(dtypes, mode, gen):
    """The loss computes in float32 (float64 for float64 log-probs) on the values as given; the reference reads
    those same (rounded) values in float64. The gradient has log_prob's dtype."""
    old, new, adv, mask, isw, _, _ = hostile_case(gen)
    t_old, t_new, t_adv, t_isw = DTYPES[dtypes]
    old, new, adv, isw = old.to(t_old), new.to(t_new), adv.to(t_adv), isw.to(t_isw)
    loss, grad, metrics = call_loss(old, new, adv, mask, mode, actor_config(mode), rollout_is_weights=isw)
    ref_loss, ref_grad, _ = reference_loss_and_grad(old, new, adv, mask, RefParams(), mode, is_weights=isw)
    assert loss.dtype == torch.promote_types(t_new, torch.float32) and grad.dtype == t_new
    tol = {"rtol": 1e-9, "atol": 1e-12} if t_new == torch.float64 else {"rtol": 2e-5, "atol": 1e-6}
    assert loss.item() == pytest.approx(ref_loss, rel=tol["rtol"], abs=tol["atol"])
    low = {"rtol": 1e-2, "atol": 1e-3} if t_new in (torch.float16, torch.bfloat16) else tol  # grad rounded to t_new
    torch.testing.assert_close(grad.double(), ref_grad, **low)
    assert all(math.isfinite(v) for v in metrics.values())


def test_strided_and_expanded_tensors_give_the_contiguous_result(gen):
    old, new, adv, mask, isw, _, _ = hostile_case(gen)
    wide = lambda x: torch.stack([x, torch.full_like(x, NAN)], dim=-1).flatten(-2)  # noqa: E731  [B, 2T]
    strided = {
        "old": old.t().contiguous().t(),  # column-major
        "new": wide(new)[:, ::2],  # stride 2
        "adv": adv[:, :1].expand(-1, adv.shape[1]),  # stride 0: verl's per-response advantage
        "mask": torch.stack([mask, ~mask], dim=-1).flatten(-2)[:, ::2],
        "isw": isw.t().contiguous().t(),
    }
    assert not any(x.is_contiguous() for x in strided.values())
    for mode in AGG_MODES:
        cfg = actor_config(mode)
        ref = call_loss(old, new, adv[:, :1].expand_as(adv).contiguous(), mask, mode, cfg, rollout_is_weights=isw)
        s = strided
        got = call_loss(s["old"], s["new"], s["adv"], s["mask"], mode, cfg, rollout_is_weights=s["isw"])
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-14, atol=0)
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-14, atol=0)
        assert got.metrics == ref.metrics


@pytest.mark.parametrize("kind", [torch.int64, torch.int32, torch.uint8, torch.float32, torch.float64])
def test_int_and_float_masks_equal_the_bool_mask(kind, gen):
    old, new, adv, mask, isw, _, _ = hostile_case(gen)
    for mode in AGG_MODES:
        cfg = actor_config(mode)
        ref = call_loss(old, new, adv, mask, mode, cfg, rollout_is_weights=isw)
        got = call_loss(old, new, adv, mask.to(kind), mode, cfg, rollout_is_weights=isw)
        assert torch.equal(got.loss, ref.loss) and torch.equal(got.grad, ref.grad) and got.metrics == ref.metrics


@pytest.mark.parametrize(
    ("name", "cut"),
    [("advantages", lambda x: x[:, 0]), ("advantages", lambda x: x[:, :1]), ("old_log_prob", lambda x: x[:, :5])],
    ids=["[B]-advantages", "[B,1]-advantages", "short-old_log_prob"],
)
def test_shapes_other_than_log_probs_are_refused_naming_the_tensor(name, cut, gen):
    """verl hands every tensor as [B, T]; a broadcast [B] or [B, 1] could silently misalign, so it is refused."""
    old, new, adv, mask = random_case(gen, batch=3, width=6)
    inputs = {"old_log_prob": old, "log_prob": new, "advantages": adv, "response_mask": mask}
    inputs[name] = cut(inputs[name])
    with pytest.raises(ValueError, match=re.escape(f"{name} has shape {tuple(inputs[name].shape)}")):
        CPPO(**inputs, loss_agg_mode="token-mean", config=actor_config())


# ---- empty micro-batches and verl's global counts ----

ROWS = {"gathered": lambda shape: None, "shard": lambda shape: ShardContext(single_rank_layout(shape))}


def _with_counts(mode, rows, shape, **info):
    cfg = actor_config(mode)
    cfg.global_batch_info.update(info)
    return cfg, {"shard": ROWS[rows](shape)} if rows == "shard" else {}


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("shape", [(0, 6), (4, 0), (0, 0)], ids=["B=0", "T=0", "B=T=0"])
@pytest.mark.parametrize(
    "info",
    [{}, {"dp_size": 1, "batch_num_tokens": 0, "global_batch_size": 0}, {"dp_size": 2, "batch_num_tokens": 9,
     "global_batch_size": 3}],
    ids=["local-counts", "global-counts-0", "dp2-counts"],
)  # fmt: skip
def test_empty_shapes_give_loss_zero_with_zero_gradient(shape, info, mode):
    empty = torch.zeros(shape, dtype=torch.float64)
    cfg, _ = _with_counts(mode, "gathered", shape, **info)
    loss, grad, metrics = call_loss(empty, empty, empty, empty.bool(), mode, cfg, rollout_is_weights=empty)
    assert loss.item() == 0 and grad.shape == shape and all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("counts", [(0, 0), (17, 5)], ids=["counts-0", "counts-of-other-micro-batches"])
def test_an_all_masked_micro_batch_with_global_counts_gives_zero(counts, mode, rows, gen):
    """verl's v1 ppo_loss always passes the mini-batch's counts; 0 (no response token in the mini-batch)
    would be 0/0 = NaN in verl's agg_loss. The loss is 0 with zero gradient either way."""
    old, new, adv, mask, isw, _, _ = hostile_case(gen)
    cfg, extra = _with_counts(mode, rows, old.shape, dp_size=1, batch_num_tokens=counts[0], global_batch_size=counts[1])
    loss, grad, metrics = call_loss(old, new, adv, torch.zeros_like(mask), mode, cfg, rollout_is_weights=isw, **extra)
    assert loss.item() == 0 and (grad == 0).all()
    assert metrics["actor/cppo_masked_frac"] == 0 and all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_explicit_global_counts_against_the_reference(dp_size, mode, rows, gen):
    old, new, adv, mask, isw, _, _ = hostile_case(gen)
    counts = {"batch_num_tokens": int(mask.sum()) * dp_size + 3, "global_batch_size": 6 * dp_size + 1}
    cfg, extra = _with_counts(mode, rows, old.shape, dp_size=dp_size, loss_scale_factor=16, **counts)
    loss, grad, _ = call_loss(old, new, adv, mask, mode, cfg, rollout_is_weights=isw, **extra)
    ref_loss, ref_grad, _ = reference_loss_and_grad(
        old, new, adv, mask, RefParams(), mode, is_weights=isw, dp_size=dp_size, loss_scale_factor=16, **counts
    )
    assert loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("mode", AGG_MODES)
def test_dp_size_above_one_without_global_counts_follows_verl(mode, rows, gen):
    """verl's agg_loss refuses a missing global count when dp_size > 1 (a local count would weight the ranks
    unequally); the cppo loss does exactly what verl's own vanilla loss does with the same config."""
    old, new, adv, mask = random_case(gen, batch=4, width=9)
    mask[:, 0] = True
    cfg, extra = _with_counts(mode, rows, old.shape, dp_size=2)
    try:
        call_loss(old, new, adv, mask, mode, cfg, loss_mode="vanilla")
    except ValueError as exc:
        with pytest.raises(ValueError, match=f"^{re.escape(str(exc))}$"):
            call_loss(old, new, adv, mask, mode, cfg, **extra)
        assert "required when dp_size > 1" in str(exc)
    else:  # token-sum needs no count: dp_size x the token sum
        assert mode == "token-sum"
        loss, _, _ = call_loss(old, new, adv, mask, mode, cfg, **extra)
        ref_loss, _, _ = reference_loss_and_grad(old, new, adv, mask, RefParams(), mode, dp_size=2)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-9)


@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize(
    ("mode", "info", "message"),
    [
        ("token-mean", {"batch_num_tokens": 0}, r"batch_num_tokens=0 \(the global count\), but this micro-batch has"),
        ("seq-mean-token-mean", {"global_batch_size": 0}, r"global_batch_size=0 .* has \d+ non-empty responses"),
    ],
)
def test_a_global_count_of_zero_with_response_tokens_is_refused(mode, info, message, rows, gen):
    old, new, adv, mask = random_case(gen, batch=4, width=9)
    mask[:, 0] = True
    cfg, extra = _with_counts(mode, rows, old.shape, dp_size=1, **info)
    with pytest.raises(ValueError, match=message):
        call_loss(old, new, adv, mask, mode, cfg, **extra)


BAD_SCALARS = [
    ("dp_size", -1, "an int >= 1"),  # verl's agg_loss multiplies by it: the loss's sign would flip
    ("dp_size", 0, "an int >= 1"),  # ... or the loss would be 0
    ("dp_size", NAN, "an int >= 1"),
    ("dp_size", 1.5, "an int >= 1"),
    ("dp_size", "2", "an int >= 1"),
    ("dp_size", torch.tensor(-2), "an int >= 1"),
    ("batch_num_tokens", -3, "a whole count >= 0"),
    ("batch_num_tokens", NAN, "a whole count >= 0"),
    ("batch_num_tokens", INF, "a whole count >= 0"),
    ("batch_num_tokens", 1e-40, "a whole count >= 0"),  # not a count; 0 < x < 1 would overflow float32
    ("batch_num_tokens", True, "a whole count >= 0"),
    ("batch_num_tokens", "9", "a whole count >= 0"),
    ("global_batch_size", -1, "a whole count >= 0"),
    ("global_batch_size", NAN, "a whole count >= 0"),
    ("global_batch_size", 2.5, "a whole count >= 0"),
    ("loss_scale_factor", 0, "a finite number > 0"),
    ("loss_scale_factor", -8, "a finite number > 0"),
    ("loss_scale_factor", INF, "a finite number > 0"),
    ("loss_scale_factor", NAN, "a finite number > 0"),
    ("loss_scale_factor", "8", "a finite number > 0"),
]


@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize(("key", "value", "allowed"), BAD_SCALARS, ids=[f"{k}={v!r}" for k, v, _ in BAD_SCALARS])
def test_every_count_and_scalar_is_refused_naming_key_and_value(key, value, allowed, mode, rows, gen):
    """Whatever aggregation mode reads it or not: a bad count is a bug upstream, never a silent loss."""
    old, new, adv, mask = random_case(gen, batch=4, width=9)
    mask[:, 0] = True
    info = {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": 4, key: value}
    cfg, extra = _with_counts(mode, rows, old.shape, **info)
    with pytest.raises(
        ValueError, match=rf"global_batch_info {key} must be {allowed}.*, got {re.escape(repr(value))}$"
    ):
        call_loss(old, new, adv, mask, mode, cfg, **extra)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize(
    ("key", "value"), [("dp_size", -1), ("dp_size", 0), ("dp_size", NAN), ("batch_num_tokens", -5)]
)
def test_bad_counts_through_verls_ppo_loss_are_refused(key, value, mode, gen):
    """verl's ppo_loss copies the micro-batch's dp_size / counts into global_batch_info and calls the loss."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    from tests.support.verl_inputs import engine_micro_batch

    old, new, adv, mask = random_case(gen, batch=3, width=7)
    mask[:, 0] = True
    model_output, data, _, _ = engine_micro_batch(old, new, adv, mask, prompt_lens=[2, 3, 1])
    tu.assign_non_tensor(data, **{key: value})
    with pytest.raises(ValueError, match=rf"global_batch_info {key} must be .*, got {re.escape(repr(value))}$"):
        ppo_loss(actor_config(mode), model_output, data)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_an_empty_mini_batch_still_gives_exactly_zero(mode):
    """The counts check keeps verl's rule for missing counts and the empty mini-batch's exact 0."""
    empty = torch.zeros(3, 5, dtype=torch.float64)
    cfg, _ = _with_counts(mode, "gathered", empty.shape, dp_size=1, batch_num_tokens=0, global_batch_size=0)
    loss, grad, _ = call_loss(empty, empty, empty, empty.bool(), mode, cfg)
    assert loss.item() == 0 and (grad == 0).all()


@pytest.mark.parametrize(
    ("mode", "setting", "named"),
    [
        ("token-sum", {"adv": 3e38}, r"advantages = 3e\+38 at \[\d, \d\]"),
        (
            "token-mean",
            {"adv": 1e38, "isw": 1e30},
            r"per-token loss at \[0, 0\] .*advantages = 1e\+38, rollout_is_weights = 1e\+30",
        ),
        ("seq-mean-token-sum-norm", {"loss_scale_factor": 1e-40}, r"loss_scale_factor=1e-40"),
    ],
    ids=["advantages-3e38", "advantages-x-is-weight", "loss_scale_factor-1e-40"],
)
def test_finite_inputs_that_overflow_float32_are_named(mode, setting, named):
    """Finite inputs beyond what float32 holds end as a non-finite loss: the error names the input."""
    old = torch.full((2, 5), -1.0)
    new, adv, mask = old + 0.05, torch.full((2, 5), setting.get("adv", 1.0)), torch.ones(2, 5, dtype=torch.bool)
    isw = torch.full((2, 5), setting["isw"]) if "isw" in setting else None
    info = {"loss_scale_factor": setting["loss_scale_factor"]} if "loss_scale_factor" in setting else {}
    cfg, _ = _with_counts(mode, "gathered", old.shape, **info)
    with pytest.raises(FloatingPointError, match=rf"^cppo loss is (inf|-inf|nan): .*{named}"):
        call_loss(old, new, adv, mask, mode, cfg, rollout_is_weights=isw)


def test_length_one_response_gets_the_full_delta():
    old = torch.log(torch.tensor([[0.30], [0.30]], dtype=torch.float64))
    new = torch.log(torch.tensor([[0.44], [0.46]], dtype=torch.float64))  # D = 0.14 and 0.16, delta = 0.15
    adv = torch.ones_like(old)
    _, grad, metrics = call_loss(old, new, adv, torch.ones_like(old, dtype=torch.bool), "token-sum", actor_config())
    assert grad[0, 0] != 0 and grad[1, 0] == 0 and metrics["actor/cppo_masked_frac"] == 0.5


@pytest.mark.parametrize("mode", AGG_MODES)
def test_all_zero_advantages(mode, gen):
    old, new, adv, mask = random_case(gen, batch=4, width=12, spread=2.0)
    loss, grad, metrics = call_loss(old, new, torch.zeros_like(adv), mask, mode, actor_config(mode))
    assert loss.item() == 0 and (grad == 0).all()
    assert metrics["actor/cppo_masked_frac"] == 0  # A = 0 counts as moving toward mu
