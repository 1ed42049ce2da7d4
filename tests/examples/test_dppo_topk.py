"""METHOD=dppo_topk_tv / dppo_topk_kl of the example scripts is DPPO's rule, token for token.

The paper's "DPPO (Top-K TV)" baseline keeps a token iff A_t (rho_t - 1) <= 0 (the update moves back toward
mu) or D_t <= delta. The scripts select it as CPPO with w_min = 1 and no prefix budget (spec, "Special
cases"). Here the actor config is the one the script's dry run instantiates, the registered ``cppo`` loss is
called with D given directly (the engine hook's keyword), and the mask read back from the gradient
(token-sum: d loss / d log pi_t = -M_t min(rho_t, cap) A_t) must equal the rule evaluated independently in
float64, including tokens with D exactly at delta."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from tests.support import REPO_ROOT
from tests.support.shell import printed_command
from verl_cppo.launch.dry_run import dry_run

ROOT = Path(REPO_ROOT)
SCRIPT = ROOT / "examples" / "run_qwen3_1.7b_fsdp.sh"


def _script_actor_config(method: str):
    """The actor config of ``METHOD=<method> bash examples/run_qwen3_1.7b_fsdp.sh`` (its dry run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CPPO_", "METHOD", "LAUNCHER", "DIVERGENCE"))}
    env.update({"PYTHON": sys.executable, "METHOD": method, "CPPO_DRY_RUN": "1", "CPPO_PRINT_CMD": "1"})
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    overrides = printed_command(out.stdout)[2:]  # after "<python> examples/dry_run.py"
    previous = os.environ.pop("VERL_CPPO_TOPK", None)
    try:
        report = dry_run(overrides, str(ROOT))
    finally:  # the driver check exports K to this process
        os.environ.pop("VERL_CPPO_TOPK", None)
        if previous is not None:
            os.environ["VERL_CPPO_TOPK"] = previous
    assert report.errors == [], report.errors
    return report.built["actor"]


def _case(dtype, gen, delta, batch=24, width=40):
    """Right-padded rows with interior holes, nonzero advantages and D spread around delta (some exactly at
    it in float64; in float32 every D and every log-ratio stays clear of the decision boundaries)."""
    lengths = torch.randint(1, width + 1, (batch,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    mask &= torch.rand(batch, width, generator=gen) > 0.1
    log_mu = torch.log(torch.rand(batch, width, generator=gen, dtype=torch.float64).clamp(min=1e-3))
    step = 0.6 * torch.randn(batch, width, generator=gen, dtype=torch.float64)
    step = torch.where(step.abs() < 1e-2, torch.sign(step + 1e-12) * 1e-2, step)
    log_pi = (log_mu + step).clamp(max=0.0)
    sign = torch.where(torch.rand(batch, 1, generator=gen) < 0.5, -1.0, 1.0).double()
    adv = (sign * (0.1 + torch.rand(batch, 1, generator=gen, dtype=torch.float64))).expand(batch, width).clone()
    div = 2 * delta * torch.rand(batch, width, generator=gen, dtype=torch.float64)
    if dtype == torch.float64:
        div[torch.rand(batch, width, generator=gen) < 0.15] = delta  # ties: kept (D <= delta)
    else:
        div = torch.where((div - delta).abs() < 1e-4, div + 2e-4, div)
    return [x.to(dtype) for x in (log_mu, log_pi, adv, div)] + [mask]


def _dppo_rule(log_mu, log_pi, adv, div, mask, delta):
    """DPPO's keep rule in float64, written out per token."""
    keep = torch.zeros(mask.shape, dtype=torch.bool)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            log_ratio = min(max(float(log_pi[b, t]) - float(log_mu[b, t]), -20.0), 20.0)
            toward_mu = float(adv[b, t]) * (math.exp(log_ratio) - 1.0) <= 0.0
            keep[b, t] = toward_mu or float(div[b, t]) <= delta
    return keep


@pytest.mark.parametrize("method", ["dppo_topk_tv", "dppo_topk_kl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dppo_topk_method_is_dppo_token_for_token(method, dtype):
    actor = _script_actor_config(method)
    cfg = actor.policy_loss.cppo
    assert (cfg.w_min, cfg.prefix_budget, cfg.divergence) == (1.0, False, method.removeprefix("dppo_"))
    gen = torch.Generator().manual_seed(7)
    log_mu, log_pi, adv, div, mask = _case(dtype, gen, cfg.delta)
    leaf = log_pi.clone().requires_grad_(True)
    loss, metrics = get_policy_loss_fn("cppo")(
        old_log_prob=log_mu,
        log_prob=leaf,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode="token-sum",
        config=actor,
        topk_divergence=div,
    )
    loss.backward()
    rho = torch.exp((log_pi.double() - log_mu.double()).clamp(-20, 20))
    coef = -rho.clamp(max=cfg.ratio_cap) * adv.double()  # d loss / d log pi of a kept token
    kept = (leaf.grad.double() / coef).round()  # 1 kept, 0 masked (coef is never 0 here)
    assert set(kept[mask].unique().tolist()) <= {0.0, 1.0}
    expected = _dppo_rule(log_mu, log_pi, adv, div, mask, cfg.delta)
    assert torch.equal(kept.bool() & mask, expected)
    assert (leaf.grad[~mask] == 0).all()
    n_valid, n_masked = int(mask.sum()), int((mask & ~expected).sum())
    assert 0 < n_masked < n_valid  # both outcomes occur
    if dtype == torch.float64:  # the ties at delta are kept whichever way the token moves
        assert expected[(div == cfg.delta) & mask].all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert leaf.grad.double()[mask] == pytest.approx((coef * expected)[mask], rel=tol, abs=tol)
    assert metrics["actor/cppo_masked_frac"] == pytest.approx(n_masked / n_valid)
    assert metrics["actor/cppo_masked_by_budget_share"] == 0.0
