"""Random micro-batches and their shards, built from the layouts' definitions (not from verl_cppo.sharding.layout).

A case is B responses inside sequences (prompt + response, verl's columns: the response's per-token values at
[prompt - 1, prompt - 1 + response_len)) with random lengths (0 and 1 included), interior mask holes, rows
with no valid token, and NaN garbage wherever no response token is (the loss must never read it). Each
rank's local tensor is cut from the packed / padded sequences exactly as the layout's docstring draws it,
so a wrong index in ``verl_cppo.sharding.layout`` cannot hide behind a consistent test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from verl_cppo.sharding import layout as shard_layout

LAYOUTS = ("contiguous", "zigzag", "zigzag_thd")


@dataclass
class Case:
    old: torch.Tensor  # [B, T] gathered rows (NaN off the responses)
    new: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor  # [B, T] bool
    is_weights: torch.Tensor | None
    prompt: list[int]
    resp_len: list[int]


def make_case(gen: torch.Generator, dtype=torch.float64, max_batch=6, max_len=14) -> Case:
    batch = int(torch.randint(1, max_batch + 1, (1,), generator=gen))
    resp_len = torch.randint(0, max_len + 1, (batch,), generator=gen)
    resp_len[torch.rand(batch, generator=gen) < 0.2] = 1  # length-1 responses
    prompt = torch.randint(1, 6, (batch,), generator=gen)
    width = max(int(resp_len.max()), 1)
    cols = torch.arange(width)
    inside = cols[None, :] < resp_len[:, None]  # [B, T]
    mask = inside & (torch.rand(batch, width, generator=gen) > 0.15)  # interior holes
    mask[torch.rand(batch, generator=gen) < 0.15] = False  # responses without a valid token
    old = torch.log(torch.rand(batch, width, generator=gen).clamp(min=1e-4))
    new = (old + 0.5 * torch.randn(batch, width, generator=gen)).clamp(max=0.0)
    adv = torch.randn(batch, 1, generator=gen).expand(batch, width).clone()
    if torch.rand(1, generator=gen) < 0.3 and mask.any():  # a non-finite log-prob on a response token
        b, t = mask.nonzero()[0].tolist()
        new[b, t] = math.nan
    is_weights = torch.rand(batch, width, generator=gen) * 2 if torch.rand(1, generator=gen) < 0.3 else None
    nan = torch.tensor(math.nan)
    old, new, adv = (torch.where(inside, x, nan).to(dtype) for x in (old, new, adv))
    return Case(
        old, new, adv, mask, None if is_weights is None else is_weights.to(dtype), prompt.tolist(), resp_len.tolist()
    )


def _sequences(case: Case, rows: torch.Tensor, fill) -> list[torch.Tensor]:
    """Each response's row placed in its sequence (prompt + response tokens), `fill` elsewhere."""
    out = []
    for b, (p, r) in enumerate(zip(case.prompt, case.resp_len)):
        seq = torch.full((p + r,), fill, dtype=rows.dtype)
        seq[p - 1 : p - 1 + r] = rows[b, :r]
        out.append(seq)
    return out


def _pad(x: torch.Tensor, length: int, fill) -> torch.Tensor:
    return torch.cat([x, torch.full((length - x.numel(),), fill, dtype=x.dtype)])


def _zigzag(x: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    chunks = x.chunk(2 * cp, dim=-1)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=-1)


@dataclass
class Shard:
    layout: shard_layout.ShardLayout
    tensors: dict  # name -> local tensor ([1, N] or [B, 2c])
    code: torch.Tensor  # local: flat index b * T + t into the gathered rows, -1 off the responses


def make_shard(case: Case, kind: str, rank: int, world: int, extra_pad: int) -> Shard:
    """This rank's shard of every gathered tensor, and the layout that describes it."""
    batch, width = case.mask.shape
    code_rows = torch.arange(batch * width).view(batch, width)
    named = {"old": case.old, "new": case.new, "adv": case.adv, "mask": case.mask, "code": code_rows}
    if case.is_weights is not None:
        named["is_weights"] = case.is_weights
    fills = {"mask": False, "code": -1}
    seq_lens = [p + r for p, r in zip(case.prompt, case.resp_len)]
    start = [p - 1 for p in case.prompt]
    local = {}
    if kind == "contiguous":  # packed stream, right-padded, one slice per rank
        total = sum(seq_lens)
        padded = -(-(total + extra_pad) // world) * world
        chunk = padded // world
        for name, rows in named.items():
            stream = _pad(
                torch.cat(_sequences(case, rows, fills.get(name, math.nan))), padded, fills.get(name, math.nan)
            )
            local[name] = stream[rank * chunk : (rank + 1) * chunk][None]
        cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()])
        layout = shard_layout.contiguous_layout(cu, start, case.resp_len, rank, world, padded_len=padded, width=width)
    elif kind == "zigzag":  # [B, S] rows, each cut into 2 cp chunks
        s = -(-(max(seq_lens) + extra_pad) // (2 * world)) * (2 * world)
        for name, rows in named.items():
            fill = fills.get(name, math.nan)
            padded = torch.stack([_pad(x, s, fill) for x in _sequences(case, rows, fill)])
            local[name] = _zigzag(padded, rank, world)
        layout = shard_layout.zigzag_layout(s, start, case.resp_len, rank, world, width=width)
    else:  # packed THD, each sequence padded to a multiple of 2 cp and cut into 2 cp chunks
        lens = [-(-(n + extra_pad) // (2 * world)) * (2 * world) for n in seq_lens]
        for name, rows in named.items():
            fill = fills.get(name, math.nan)
            parts = [_zigzag(_pad(x, n, fill), rank, world) for x, n in zip(_sequences(case, rows, fill), lens)]
            local[name] = torch.cat(parts)[None]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        layout = shard_layout.zigzag_thd_layout(cu, start, case.resp_len, rank, world, width=width)
    code = local.pop("code")
    return Shard(layout, local, code)
