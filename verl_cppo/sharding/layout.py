"""Where each shard-local token sits in its response: the three sequence-sharding layouts of verl 0.9.1.

A layout is pure index arithmetic (no communication). For every token of this rank's local tensor, in
row-major order of that tensor, it gives the response it belongs to (``row``, -1 for prompt, padding and
anything outside a response), its 1-based position in that response (``position``, counting every response
token, masked ones included) and which ``piece`` of the response the token lies in. The pieces of a response
are numbered in sequence order and every rank holds whole, contiguous runs of pieces, so a global prefix sum
is (sum of the totals of the earlier pieces) + (a local scan within the piece): that is all
``verl_cppo.sharding.scan`` communicates.

Sequences are described as verl lays them out: sequence b (prompt + response, ``seq_lens[b]`` tokens) has
its response's per-token values (log-probs predict the next token) at columns
``[response_start[b], response_start[b] + response_len[b])`` of the sequence; verl's
``no_padding_2_padding`` reads them at ``response_start = prompt_len - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ShardLayout", "contiguous_layout", "single_rank_layout", "zigzag_layout", "zigzag_thd_layout"]


@dataclass(frozen=True)
class ShardLayout:
    """Per-token coordinates of one rank's shard of a micro-batch of ``num_rows`` responses."""

    row: torch.Tensor
    """[N] int64: index of the token's response in the micro-batch, -1 outside every response."""

    position: torch.Tensor
    """[N] int64: 1-based position of the token in its response (interior masked tokens counted), 0 outside."""

    piece: torch.Tensor
    """[N] int64: piece of the response the token lies in, in [0, num_pieces); pieces are in sequence order."""

    num_rows: int
    """B: responses in the micro-batch (the rows of the gathered [B, T] tensors)."""

    num_pieces: int
    """P: pieces each response is cut into (Ulysses: the group size; Megatron zigzag: 2 * cp)."""

    rank_pieces: torch.Tensor
    """[world, K] int64: the pieces each rank of the group holds (the same K for every rank)."""

    width: int
    """T of the gathered [B, T] rows, the longest response: seq-mean-token-sum-norm's default horizon."""

    def __post_init__(self):
        n = self.row.numel()
        if self.position.numel() != n or self.piece.numel() != n:
            raise ValueError(
                f"ShardLayout: row, position, piece have {n}, {self.position.numel()}, "
                f"{self.piece.numel()} entries; they must match"
            )
        inside = self.row >= 0
        if inside.any():
            if int(self.row.max()) >= self.num_rows or int(self.piece[inside].max()) >= self.num_pieces:
                raise ValueError("ShardLayout: row or piece out of range")
            # A local scan is exact only if each (response, piece) is one contiguous run of local tokens.
            cell = torch.where(inside, self.row * self.num_pieces + self.piece, -1)  # [N]
            starts = inside & torch.cat([cell.new_ones(1, dtype=torch.bool), cell[1:] != cell[:-1]])
            if int(starts.sum()) != cell[inside].unique().numel():
                raise ValueError("ShardLayout: a (response, piece) is split into several runs of local tokens")

    def to(self, device) -> ShardLayout:
        """The same layout with its tensors on `device`."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return ShardLayout(**moved)

    @property
    def cell(self) -> torch.Tensor:
        """[N] int64: row * num_pieces + piece, -1 outside every response."""
        return torch.where(self.row >= 0, self.row * self.num_pieces + self.piece, -1)


def _as_long(x, device=None) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long, device=device)


def _locate(seq, col, piece, response_start, response_len, rank_pieces, width) -> ShardLayout:
    """Turn (sequence, column) coordinates of local tokens into response rows and positions."""
    response_start = _as_long(response_start, seq.device)
    response_len = _as_long(response_len, seq.device)
    num_rows = response_len.numel()
    s = seq.clamp(min=0)
    pos = col - response_start[s] + 1 if num_rows else torch.zeros_like(col)  # [N]
    inside = (seq >= 0) & (pos >= 1) & (pos <= response_len[s]) if num_rows else seq < -1  # [N]
    if width is None:
        width = int(response_len.max()) if num_rows else 0
    return ShardLayout(
        row=torch.where(inside, seq, -1),
        position=torch.where(inside, pos, 0),
        piece=torch.where(inside, piece, 0),
        num_rows=num_rows,
        num_pieces=int(rank_pieces.max()) + 1,
        rank_pieces=rank_pieces,
        width=width,
    )


def contiguous_layout(
    cu_seqlens, response_start, response_len, rank: int, world_size: int, *, padded_len=None, width=None
) -> ShardLayout:
    """(a) Contiguous slices of a packed token stream (verl's Ulysses SP, ``ulysses_pad_and_slice_inputs``).

    All sequences are packed end to end (``cu_seqlens`` [B + 1]), the stream is right-padded to
    ``padded_len`` (default: the next multiple of world_size) and rank r holds one contiguous slice, so a
    response may straddle any number of ranks and a rank may hold none of a response, or nothing but padding::

        packed stream  |--seq 0--|----seq 1----|-seq 2-|pad|
        ranks          |  rank 0   |   rank 1   |  rank 2   |     piece of a response = the rank holding it

    The local tensor is the rank's slice, [1, padded_len / world_size]. response_start, response_len: [B].
    """
    cu = _as_long(cu_seqlens)
    total = int(cu[-1])
    if padded_len is None:
        padded_len = -(-total // world_size) * world_size
    if padded_len % world_size or padded_len < total:
        raise ValueError(
            f"contiguous_layout: padded_len={padded_len} must be a multiple of world_size="
            f"{world_size} and at least the packed length {total}"
        )
    chunk = padded_len // world_size
    g = rank * chunk + torch.arange(chunk)  # [N] global stream index
    seq = torch.searchsorted(cu[1:], g, right=True)  # [N] first b with cu[b + 1] > g
    seq = torch.where(g < total, seq, -1)
    col = g - cu[seq.clamp(min=0)]
    piece = torch.full_like(g, rank)
    rank_pieces = torch.arange(world_size)[:, None]  # [world, 1]
    return _locate(seq, col, piece, response_start, response_len, rank_pieces, width)


def _zigzag_pieces(cp: int) -> torch.Tensor:
    r = torch.arange(cp)
    return torch.stack([r, 2 * cp - 1 - r], dim=1)  # [cp, 2]: rank r holds chunks r and 2cp-1-r


def zigzag_layout(
    seq_len_padded: int, response_start, response_len, rank: int, cp_size: int, *, width=None
) -> ShardLayout:
    """(b) Megatron CP load balancing of [B, S] rows (``get_batch_on_this_cp_rank``, verl's BSHD path).

    Every row is padded to S (a multiple of 2 * cp), cut into 2 * cp chunks of S / (2 cp) tokens, and rank r
    holds chunks r and 2cp-1-r (early and late tokens, to balance causal attention), concatenated::

        row b       | c0 | c1 | c2 | c3 |      cp = 2
        rank 0      | c0 | c3 |                local [B, 2 * S / (2 cp)], flattened row-major
        rank 1      | c1 | c2 |                piece of a response = chunk index

    response_start, response_len: [B] columns of each response within its row.
    """
    if seq_len_padded % (2 * cp_size):
        raise ValueError(f"zigzag_layout: seq_len_padded={seq_len_padded} is not a multiple of 2 * cp = {2 * cp_size}")
    batch = _as_long(response_len).numel()
    chunk = seq_len_padded // (2 * cp_size)
    j = torch.arange(2 * chunk)  # [2c] local column
    late = j >= chunk
    piece = torch.where(late, 2 * cp_size - 1 - rank, rank)  # [2c]
    col = piece * chunk + j - late.long() * chunk  # [2c] global column in the row
    seq = torch.arange(batch)[:, None].expand(batch, 2 * chunk).reshape(-1)  # [B * 2c]
    col = col.repeat(batch)
    piece = piece.repeat(batch)
    return _locate(seq, col, piece, response_start, response_len, _zigzag_pieces(cp_size), width)


def zigzag_thd_layout(
    cu_seqlens_padded, response_start, response_len, rank: int, cp_size: int, *, width=None
) -> ShardLayout:
    """(c) Megatron CP load balancing per document of a packed THD batch (verl's ``preprocess_thd_engine``).

    Sequence b is padded to S_b = cu_seqlens_padded[b + 1] - cu_seqlens_padded[b] (a multiple of 2 * cp),
    cut into 2 * cp chunks of S_b / (2 cp), and rank r holds chunks r and 2cp-1-r of every sequence, packed
    in sequence order::

        packed          | a0 a1 a2 a3 | b0 b1 b2 b3 |      cp = 2, sequences a and b
        rank 0 local    | a0 a3 | b0 b3 |                 [1, sum_b S_b / cp]
        rank 1 local    | a1 a2 | b1 b2 |                 piece of a response = chunk index

    Padding columns of a sequence (beyond its true length) lie outside every response.
    """
    cu = _as_long(cu_seqlens_padded)
    lens = cu.diff()  # [B] S_b
    if (lens % (2 * cp_size)).any():
        raise ValueError(
            f"zigzag_thd_layout: padded lengths {lens.tolist()} must be multiples of 2 * cp = {2 * cp_size}"
        )
    chunk = lens // (2 * cp_size)  # [B] c_b
    local_lens = 2 * chunk  # [B]
    seq = torch.repeat_interleave(torch.arange(lens.numel()), local_lens)  # [N]
    local_start = torch.cumsum(local_lens, 0) - local_lens  # [B]
    j = torch.arange(int(local_lens.sum())) - local_start[seq]  # [N] offset in the sequence's local block
    c = chunk[seq]
    late = j >= c
    piece = torch.where(late, 2 * cp_size - 1 - rank, rank)  # [N]
    col = piece * c + j - late.long() * c  # [N]
    return _locate(seq, col, piece, response_start, response_len, _zigzag_pieces(cp_size), width)


def single_rank_layout(shape, response_len=None) -> ShardLayout:
    """The unsharded [B, T] rows as a layout of world size 1 (response b = row b, position = column + 1)."""
    batch, width = shape
    response_len = [width] * batch if response_len is None else response_len
    cu = torch.arange(batch + 1) * width
    return contiguous_layout(cu, [0] * batch, response_len, 0, 1, width=width)
