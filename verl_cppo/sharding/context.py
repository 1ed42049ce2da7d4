"""The ``cppo`` loss on shard-local tokens: the mask from global prefix sums, verl's aggregation, metrics.

``ShardContext`` is what ``verl_cppo.loss.compute_policy_loss_cppo(..., shard=...)`` takes: the rank's layout
(``verl_cppo.sharding.layout``) and its process group. It implements the loss's rows interface
(``verl_cppo.loss.LossRows``, over ``verl_cppo.core.token_loss.Rows``): ``mask`` runs the distributed scan and
quantile of ``verl_cppo.sharding.scan`` and the unchanged ``core.mask.prefix_gate`` on each token (as a
one-column row), ``aggregate`` verl's ``agg_loss`` on the local tokens with the gathered normalisers, and
``reduce_sums`` one all_gather of the metric sums.

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
import torch.distributed as dist
from verl.trainer.ppo.core_algos import agg_loss

from verl_cppo.core.mask import CPPOMask, as_float, prefix_gate
from verl_cppo.core.token_loss import PER_RESPONSE, RHO_MAX, TokenLossParams
from verl_cppo.loss import agg_loss_keywords
from verl_cppo.sharding.layout import ShardLayout
from verl_cppo.sharding.scan import CommStats, ShardScan, gather_rows, shard_prefix_scan, shard_quantile

__all__ = ["ShardContext"]


@dataclass
class ShardContext:
    """What the ``cppo`` loss needs to run on shard-local rows: this rank's layout and its group.

    Pass it as ``shard=`` to ``verl_cppo.loss.compute_policy_loss_cppo``; the tensors then hold this
    rank's tokens ([R, L], flattened row-major in the layout's order). group=None means world size 1.
    """

    layout: ShardLayout
    group: dist.ProcessGroup | None = None
    radix_bits: int = 4
    stats: CommStats = field(default_factory=CommStats)
    scan: ShardScan | None = None
    delta_b: torch.Tensor | None = None  # [B]
    whole: torch.Tensor | None = None  # the gathered loss value (set by reduce_sums)
    fusable = False  # the fused kernel needs whole rows

    def nonempty(self, valid_per_row: torch.Tensor) -> torch.Tensor:
        """[B] 0/1: responses with at least one valid token (global; the local counts are not used)."""
        return as_float(self.scan.n_valid > 0, valid_per_row.dtype)

    def mask(self, div, valid, toward_mu, params: TokenLossParams, response_mask, validf=None, maskf=None) -> CPPOMask:
        """``core.mask.cppo_mask`` for shard-local tokens (any shape, flattened in layout order)."""
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

    def aggregate(self, loss_mat, loss_mask, loss_agg_mode: str, global_batch_info: dict) -> torch.Tensor:
        """This rank's share of verl's agg_loss over the gathered rows (sums to it over the group).

        verl's agg_loss is linear in the per-token losses once the normalisers are global, so it runs on
        the local tokens with the gathered counts (``verl_cppo.loss.agg_loss_keywords``, as for gathered
        rows); seq-mean-token-mean's per-response token count is folded into the tokens
        (x (n_local_row + 1e-8) / (n_response + 1e-8)).
        """
        scan = self.scan
        info = agg_loss_keywords(  # the counts of the gathered responses stand in for the local ones
            global_batch_info,
            loss_agg_mode,
            num_tokens=lambda: scan.n_mask.sum(),
            num_seqs=lambda: (scan.n_mask > 0).sum(),
            width=self.layout.width,
        )
        if loss_agg_mode == "seq-mean-token-mean":
            row = self.layout.row.clamp(min=0).view(loss_mat.shape)
            # the denominators exactly as agg_loss forms them (an int64 count + 1e-8 is a float32 tensor)
            den_local = loss_mask.sum(dim=-1, keepdim=True) + 1e-8  # [R, 1]
            den_response = scan.n_mask[row] + 1e-8  # [R, L] the gathered row's count
            scale = den_local.to(loss_mat.dtype) / den_response.to(loss_mat.dtype)  # [R, L]
            loss_mat = torch.where(loss_mask, loss_mat * scale, 0.0)
        return agg_loss(loss_mat=loss_mat, loss_mask=loss_mask, loss_agg_mode=loss_agg_mode, **info)

    def reduce_sums(self, stats: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's STAT_NAMES sums and loss from this rank's, in one all_gather.

        Token sums and this rank's loss share are summed, rho_max is maxed, and the per-response sums are
        already the group's (the scan is global). Also keeps the gathered loss for ``whole_loss``."""
        token = torch.cat([stats[:RHO_MAX], stats[RHO_MAX + 1 : PER_RESPONSE], loss.reshape(1)])
        both = torch.cat([token.double(), stats[RHO_MAX].double().reshape(1)])
        gathered = gather_rows(both, self.group, self.stats, "metrics")  # [world, K + 1]
        total, rho_max = gathered[:, :-1].sum(0), gathered[:, -1].amax()
        self.whole = total[-1]
        stats = torch.cat([total[:RHO_MAX], rho_max.reshape(1), total[RHO_MAX:-1], stats[PER_RESPONSE:].double()])
        return stats, total[-1:]

    def whole_loss(self, local: torch.Tensor) -> torch.Tensor:
        """Value: the gathered loss; gradient: that of this rank's share (see the module docstring)."""
        return local + (self.whole.to(local.dtype) - local).detach()

    def whole_losses(self, locals_: list[torch.Tensor]) -> list[torch.Tensor]:
        """``whole_loss`` for several local shares (extra loss terms), reduced in one message."""
        shares = torch.stack([x.detach().double().reshape(()) for x in locals_])
        total = gather_rows(shares, self.group, self.stats, "extra").sum(0)  # [K]
        return [x + (t.to(x.dtype) - x).detach() for x, t in zip(locals_, total, strict=True)]
