"""Shard-local CPPO equals the gathered computation: gloo ranks on CPU, world sizes 2, 3, 4, every layout.

Each rank cuts its shard from random micro-batches (``tests/support/shard_cases.py``: responses straddling ranks,
ranks holding no response token, length-0 and length-1 responses, interior mask holes, NaN off the
responses) and checks against the gathered rows on the same rank:
  * the layout's rows and positions against the data's own placement;
  * the distributed scan (global exclusive prefix sums of w*D and w, lengths) against ``mask``'s functions on
    the gathered rows, and the distributed quantile against ``row_quantile`` bit for bit;
  * the registered loss with ``shard=``: loss value, every metric, and the gradient on each local token;
  * the bytes and messages sent, against the formulas in ``verl_cppo.sharding.scan``'s docstring.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.distributed import run_ranks
from tests.support.loss_call import call_loss
from tests.support.shard_cases import LAYOUTS, make_case, make_shard
from tests.support.verl_inputs import AGG_MODES, actor_config
from verl_cppo.core.divergence import binary_tv
from verl_cppo.core.mask import exclusive_cumsum, position_weights, response_lengths, row_quantile
from verl_cppo.loss import compute_policy_loss_cppo
from verl_cppo.sharding.context import ShardContext
from verl_cppo.sharding.layout import single_rank_layout
from verl_cppo.sharding.scan import CommStats, shard_prefix_scan, shard_quantile

SETTINGS = [
    {},
    {"delta_b_quantile": None, "delta_b": 0.015},
    {"position_horizon": 9, "gate": "soft"},
    {"divergence": "binary_kl", "delta": 0.05, "delta_b_quantile": 0.5},
    {"position_weight": False, "prefix_budget": True, "delta_b_quantile": 1.0},
    {"prefix_budget": False, "delta_b_quantile": 0.0},
]
CASES_PER_LAYOUT = 6


def _tol(case, dtype, ref_grad):
    """Tolerances of the shard-local loss against the gathered one, derived from the case's own data.

    Both paths compute each token's coefficient M sg(min(rho, cap)) A w / N from the same inputs with <= 10
    rounded operations each, except the gate's prefix sums (float64 on shards, a float32 scan of <= T terms when
    gathered: <= T u of S, which is non-negative) that feed the soft gate's weight S_t / (delta + delta_b W):
    per token the two coefficients differ by at most 2 (2 T + 10) u relative. The loss sums its n = B T terms
    L_t = coef_t log pi_t in float32 (the gathered path in one order, the shards in another, then float64):
    two orders differ by 2 n u sum |L_t| (``reorder_bound``), and sum |L_t| = sum |grad_t log pi_t| (the loss is
    linear in log pi with a detached coefficient), taken from the gathered path's own gradient. The metrics are
    sums of the same n per-token values: non-negative (relative bound) except ppo_kl, scaled by mean |log ratio|.
    2x margin on each. A token counted twice or dropped, or a wrong normaliser, moves these by >= 1/n.
    u is the dtype's unit roundoff (2^-24 float32, 2^-53 float64)."""
    u = torch.finfo(dtype).eps / 2
    n, width = case.mask.numel(), case.mask.shape[1]
    per_token = 2 * (2 * width + 10) * u  # [relative] the coefficient of one token
    valid = case.mask & case.new.isfinite()
    abs_loss = float((ref_grad.double() * torch.nan_to_num(case.new.double())).abs().sum())  # sum |L_t|
    abs_kl = float((case.new.double() - case.old.double())[valid].abs().sum()) / max(int(valid.sum()), 1)
    total = 2 * n * u + per_token  # [relative to the absolute sum] reorder_bound at the dtype's u
    return {
        "rtol": 2 * per_token,
        "atol": 0.0,
        "loss_atol": 2 * total * abs_loss,
        "metric_rel": 2 * total,
        "kl_atol": 2 * total * abs_kl,
    }


def _check_scan(case, shard, group, rank):
    """The distributed scan and quantile against mask.py's functions on the gathered rows."""
    valid = case.mask & case.new.isfinite()
    div = torch.where(valid, binary_tv(torch.nan_to_num(case.new), torch.nan_to_num(case.old)), 0.0)  # [B, T]
    lengths = response_lengths(case.mask)  # [B]
    positions = torch.arange(1, div.shape[1] + 1, dtype=div.dtype)[None]
    w = torch.where(valid, position_weights(positions, lengths[:, None].to(div.dtype), 0.8), 0.0)
    s_ref, w_ref = exclusive_cumsum(w * div).flatten(), exclusive_cumsum(w).flatten()

    code = shard.code.flatten()
    local = lambda x: torch.where(code >= 0, x.flatten()[code.clamp(min=0)], x.new_zeros(()))  # noqa: E731
    stats = CommStats()
    scan = shard_prefix_scan(local(div), local(valid), local(case.mask), shard.layout, group, w_min=0.8, stats=stats)
    inside = code >= 0
    torch.testing.assert_close(scan.s_excl[inside], s_ref[code[inside]].double(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(scan.w_excl[inside], w_ref[code[inside]].double(), rtol=1e-12, atol=1e-13)
    assert torch.equal(scan.lengths, lengths)
    for q, bits in ((0.9, 4), (0.0, 4), (1.0, 4), (0.37, 4), (0.9, 1)):
        quant = shard_quantile(scan, shard.layout, q, div.dtype, group, radix_bits=bits, stats=stats)
        assert torch.equal(quant, row_quantile(div, valid, q)), (rank, q, bits, quant, row_quantile(div, valid, q))
    tied = (div * 6).round() / 6  # a handful of distinct values: ties inside and across ranks
    scan = shard_prefix_scan(local(tied), local(valid), local(case.mask), shard.layout, group, w_min=0.8)
    for q in (0.9, 0.5, 0.1):
        quant = shard_quantile(scan, shard.layout, q, div.dtype, group)
        assert torch.equal(quant, row_quantile(tied, valid, q)), (rank, q, quant, row_quantile(tied, valid, q))


def _check_loss(case, shard, group, setting, mode, dtype):
    cfg = actor_config(mode, cppo=setting)
    new = case.new.clone().requires_grad_(True)
    ref_loss, ref_metrics = compute_policy_loss_cppo(
        old_log_prob=case.old,
        log_prob=new,
        advantages=case.adv,
        response_mask=case.mask,
        loss_agg_mode=mode,
        config=cfg,
        rollout_is_weights=case.is_weights,
    )
    ref_loss.backward()
    t = shard.tensors
    local_new = t["new"].clone().requires_grad_(True)
    ctx = ShardContext(shard.layout, group)
    loss, metrics = compute_policy_loss_cppo(
        old_log_prob=t["old"],
        log_prob=local_new,
        advantages=t["adv"],
        response_mask=t["mask"],
        loss_agg_mode=mode,
        config=cfg,
        rollout_is_weights=t.get("is_weights"),
        shard=ctx,
    )
    loss.backward()
    tol = _tol(case, dtype, torch.nan_to_num(new.grad))
    torch.testing.assert_close(
        loss.detach(), ref_loss.detach(), rtol=0, atol=tol["loss_atol"], msg=lambda m: f"{m} ({setting}, {mode})"
    )
    assert metrics.keys() == ref_metrics.keys()
    for key, value in ref_metrics.items():
        slack = tol["kl_atol"] if key == "actor/ppo_kl" else 0.0
        assert metrics[key] == pytest.approx(value, rel=tol["metric_rel"], abs=slack), key
    code = shard.code
    ref_grad = torch.where(code >= 0, torch.nan_to_num(new.grad).flatten()[code.clamp(min=0)], 0.0)
    torch.testing.assert_close(local_new.grad, ref_grad, rtol=tol["rtol"], atol=tol["atol"])
    # Communication: 1 scan message, R quantile rounds, 1 metrics message; nothing proportional to tokens.
    batch, per_rank = case.mask.shape[0], shard.layout.rank_pieces.shape[1]
    world = shard.layout.rank_pieces.shape[0]
    tags = [tag for tag, _ in ctx.stats.log]
    assert tags == ["scan"] + ["quantile"] * (len(tags) - 2) + ["metrics"] if world > 1 else tags == []
    for tag, nbytes in ctx.stats.log:
        wire = 4 if dtype == torch.float32 else 8  # bytes of a count or key on the wire
        limit = {"scan": 8 * 9 * batch * per_rank, "quantile": wire * 2 * batch * 16, "metrics": 8 * 11}[tag]
        assert nbytes == limit if tag != "quantile" else 0 < nbytes <= limit, (tag, nbytes, limit)
    assert ctx.stats.bytes_received == (world - 1) * ctx.stats.bytes_sent
    if cfg.policy_loss.cppo.delta_b_quantile is None:
        assert "quantile" not in tags


def _extra_pad(gen) -> int:
    """Padding beyond the data: often none, sometimes enough to leave a rank without response tokens."""
    return int(torch.randint(0, 40, (1,), generator=gen)) if torch.rand(1, generator=gen) < 0.5 else 0


def _ranks_body(rank, world, seed):
    import torch.distributed as dist

    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(seed)
    n = 0
    for kind in LAYOUTS:
        for i in range(CASES_PER_LAYOUT):
            dtype = torch.float64 if i % 3 else torch.float32
            case = make_case(gen, dtype)
            shard = make_shard(case, kind, rank, world, _extra_pad(gen))
            lay = shard.layout
            code = shard.code.flatten()
            inside = code >= 0
            width = case.mask.shape[1]
            assert torch.equal(lay.row, torch.where(inside, code // width, -1)), (kind, i)
            assert torch.equal(lay.position, torch.where(inside, code % width + 1, 0)), (kind, i)
            if i == 1:  # the scan and the quantile alone, on one float64 case per layout
                _check_scan(case, shard, group, rank)
            _check_loss(case, shard, group, SETTINGS[n % len(SETTINGS)], AGG_MODES[n % len(AGG_MODES)], dtype)
            n += 1
    return n


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shard_local_equals_gathered(world):
    counts = run_ranks(_ranks_body, world, 1000 + world, time_limit_s=240)
    assert counts == [len(LAYOUTS) * CASES_PER_LAYOUT] * world


def test_every_shard_kind_is_exercised():
    """The random cases do produce straddling responses and ranks without response tokens."""
    gen = torch.Generator().manual_seed(1004)
    straddle, empty = dict.fromkeys(LAYOUTS, 0), dict.fromkeys(LAYOUTS, 0)
    for kind in LAYOUTS:
        for _ in range(CASES_PER_LAYOUT):
            case = make_case(gen)
            shards = [make_shard(case, kind, r, 4, _extra_pad(gen)) for r in range(4)]
            rows = [set(s.layout.row[s.layout.row >= 0].tolist()) for s in shards]
            empty[kind] += sum(not r for r in rows)
            straddle[kind] += sum(len([r for r in rows if b in r]) > 1 for b in range(case.mask.shape[0]))
    assert min(straddle.values()) >= 5 and min(empty.values()) >= 2, (straddle, empty)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_world_size_one_is_the_ordinary_path(mode, gen):
    """ShardContext over one rank (no process group) gives the ordinary loss, gradient and metrics."""
    from tests.support.reference import random_case

    for setting in SETTINGS:
        old, new, adv, mask = random_case(gen, batch=5, width=23, spread=0.5)
        cfg = actor_config(mode, cppo=setting)
        out = []
        for shard in (None, ShardContext(single_rank_layout(old.shape))):
            out.append(call_loss(old, new, adv, mask, mode, cfg, shard=shard))
        (loss_a, grad_a, met_a), (loss_b, grad_b, met_b) = out
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-12, atol=1e-15)
        assert met_b == pytest.approx(met_a, rel=1e-12, abs=1e-15)


def test_shuffle_positions_is_refused_on_shards(gen):
    from tests.support.reference import random_case

    old, new, adv, mask = random_case(gen, batch=2, width=5)
    cfg = actor_config("token-mean", cppo={"shuffle_positions": True})
    with pytest.raises(ValueError, match="shuffle_positions"):
        compute_policy_loss_cppo(
            old_log_prob=old,
            log_prob=new,
            advantages=adv,
            response_mask=mask,
            config=cfg,
            shard=ShardContext(single_rank_layout(old.shape)),
        )
