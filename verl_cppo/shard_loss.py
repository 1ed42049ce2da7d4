"""The ``cppo`` loss on shard-local tokens: the mask from global prefix sums, verl's aggregation, metrics.

``ShardContext`` is what ``verl_cppo.loss.compute_policy_loss_cppo(..., shard=...)`` takes: the rank's layout
(``verl_cppo.shard_layout``) and its process group. It runs the distributed scan and quantile of
``verl_cppo.sharding``, the unchanged ``mask.prefix_gate`` on each token (as a one-column row), verl's
``agg_loss`` on the local tokens with the gathered normalisers, and one all_gather of the metric sums.

Loss and gradient. The per-token coefficients are computed without gradient, so the gathered loss L is a
sum over tokens, L = sum_r L_r with L_r this rank's tokens' share (global normalisers from the scan). Each rank
returns ``L_r + (L - L_r).detach()``: the value is the gathered loss, the gradient is that of L_r, which is
exactly the gradient the gathered computation sends into this rank's own log-probs (the gather keeps
autograd only on the local shard). Megatron's 2-tuple loss path multiplies the returned loss by cp_size and
averages gradients over DP x CP, as it does for the gathered loss, so the parameter gradient is unchanged;
its per-token (3-tuple) path scales every rank's loss by the same constants, which commutes too. An engine
that gets its x sp from the gather's backward (Ulysses' ``Gather.backward``) must multiply by sp itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from verl.trainer.ppo.core_algos import agg_loss

from verl_cppo.mask import CPPOMask, MaskParams, prefix_gate
from verl_cppo.shard_layout import ShardLayout
from verl_cppo.sharding import CommStats, ShardScan, gather_rows, shard_prefix_scan, shard_quantile

__all__ = ["ShardContext"]


@dataclass
class ShardContext:
    """What the ``cppo`` loss needs to run on shard-local rows: this rank's layout and its group.

    Pass it as ``shard=`` to ``verl_cppo.loss.compute_policy_loss_cppo``; the tensors then hold this
    rank's tokens ([R, L], flattened row-major in the layout's order). group=None means world size 1.
    """

    layout: ShardLayout
    group: object = None
    radix_bits: int = 4
    stats: CommStats = field(default_factory=CommStats)
    scan: ShardScan | None = None
    delta_b: torch.Tensor | None = None  # [B]
    whole: torch.Tensor | None = None  # the gathered loss value (set by reduce_metric_sums)

    @property
    def nonempty(self) -> torch.Tensor:
        """[B] bool: responses with at least one valid token (global)."""
        return self.scan.n_valid > 0

    def cppo_mask(self, div, valid, toward_mu, params: MaskParams, response_mask) -> CPPOMask:
        """``mask.cppo_mask`` for shard-local tokens (any shape, flattened in layout order)."""
        if params.shuffle_positions:
            raise ValueError("cppo.shuffle_positions=True cannot run on shard-local rows (a global permutation)")
        shape = div.shape
        if self.layout.row.device != div.device:
            self.layout = self.layout.to(div.device)
        div, valid, toward_mu = div.reshape(-1), valid.reshape(-1), toward_mu.reshape(-1)
        if div.numel() != self.layout.row.numel():
            raise ValueError(
                f"shard-local cppo loss: inputs have {div.numel()} tokens, the layout {self.layout.row.numel()}"
            )
        scan = shard_prefix_scan(
            div,
            valid,
            response_mask.reshape(-1).bool(),
            self.layout,
            self.group,
            w_min=params.w_min,
            position_horizon=params.position_horizon,
            position_weight=params.position_weight,
            stats=self.stats,
        )
        valid = scan.valid
        floor = params.delta_b
        if params.delta_b_quantile is None:
            delta_b = torch.full((self.layout.num_rows,), floor, dtype=div.dtype, device=div.device)
        else:  # as mask.calibrated_delta_b, with the exact sharded quantile
            quant = shard_quantile(
                scan,
                self.layout,
                params.delta_b_quantile,
                div.dtype,
                self.group,
                radix_bits=self.radix_bits,
                stats=self.stats,
            )
            calibrated = (params.delta_b_scale * quant).clamp(floor, params.delta_b_max_mult * floor)
            delta_b = torch.where(scan.n_valid > 0, calibrated, torch.full_like(calibrated, floor))
        div = torch.where(valid, div, 0.0)
        z = scan.weight * div  # [N]
        col = lambda x: x[:, None]  # noqa: E731  each token its own [1]-wide row for prefix_gate
        weight, masked, by_budget = prefix_gate(
            col(z),
            col(scan.s_excl.to(div.dtype)),
            col(scan.w_excl.to(div.dtype)),
            delta_b[self.layout.row.clamp(min=0)],
            col(toward_mu),
            col(valid),
            params,
        )
        self.scan, self.delta_b = scan, delta_b
        return CPPOMask(weight.view(shape), masked.view(shape), by_budget.view(shape), delta_b)

    def agg_loss(self, loss_mat, loss_mask, loss_agg_mode: str, global_batch_info: dict) -> torch.Tensor:
        """This rank's share of verl's agg_loss over the gathered rows (sums to it over the group).

        verl's agg_loss is linear in the per-token losses once the normalisers are global, so it runs on
        the local tokens with the gathered counts; seq-mean-token-mean's per-response token count is
        folded into the tokens (x (n_local_row + 1e-8) / (n_response + 1e-8)).
        """
        scan = self.scan
        info = dict(global_batch_info)
        if info.get("batch_num_tokens") is None:
            info["batch_num_tokens"] = scan.n_mask.sum().clamp(min=1)
        if info.get("global_batch_size") is None:
            info["global_batch_size"] = (scan.n_mask > 0).sum().clamp(min=1)
        if loss_agg_mode == "seq-mean-token-sum-norm" and info.get("loss_scale_factor") is None:
            info["loss_scale_factor"] = self.layout.width
        if loss_agg_mode == "seq-mean-token-mean":
            row = self.layout.row.clamp(min=0).view(loss_mat.shape)
            # the denominators exactly as agg_loss forms them (an int64 count + 1e-8 is a float32 tensor)
            den_local = loss_mask.sum(dim=-1, keepdim=True) + 1e-8  # [R, 1]
            den_response = scan.n_mask[row] + 1e-8  # [R, L] the gathered row's count
            scale = den_local.to(loss_mat.dtype) / den_response.to(loss_mat.dtype)  # [R, L]
            loss_mat = torch.where(loss_mask, loss_mat * scale, 0.0)
        return agg_loss(loss_mat=loss_mat, loss_mask=loss_mask, loss_agg_mode=loss_agg_mode, **info)

    def reduce_metric_sums(self, sums: torch.Tensor, maximum: torch.Tensor):
        """Sum the metric numerators/denominators [K] (last entry: this rank's loss) and max `maximum`."""
        both = torch.cat([sums.double(), maximum.double().reshape(1)])
        gathered = gather_rows(both, self.group, self.stats, "metrics")  # [world, K + 1]
        total = gathered[:, :-1].sum(0)
        self.whole = total[-1]
        return total, gathered[:, -1].amax()

    def whole_loss(self, local: torch.Tensor) -> torch.Tensor:
        """Value: the gathered loss; gradient: that of this rank's share (see the module docstring)."""
        return local + (self.whole.to(local.dtype) - local).detach()

    def whole_losses(self, locals_: list[torch.Tensor]) -> list[torch.Tensor]:
        """``whole_loss`` for several local shares (extra loss terms), reduced in one message."""
        shares = torch.stack([x.detach().double().reshape(()) for x in locals_])
        total = gather_rows(shares, self.group, self.stats, "extra").sum(0)  # [K]
        return [x + (t.to(x.dtype) - x).detach() for x, t in zip(locals_, total, strict=True)]
