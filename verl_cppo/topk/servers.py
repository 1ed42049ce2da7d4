"""Server side of the rollout top-K: verl's vLLM / SGLang ``generate`` (with ``topk_rollout_servers.diff``) turn
the engine's answer into mu's top-K arrays for ``TokenOutput.extra_fields`` (``rollout_topk_ids`` int32 [n, K],
``rollout_topk_log_probs`` float32 [n, K]).

vLLM: ``vllm_topk_request`` marks the request (``logprobs=K`` and ``extra_args[TOPK_REQUEST_KEY]``), so that the
frontend keeps the EngineCore's arrays (``verl_cppo.topk.vllm_arrays``); ``add_vllm_topk`` slices them, and
verl's sampled-token log-probs come from the same arrays. SGLang: ``sglang_topk`` unzips its
``(logprob, token_id, text)`` tuples in C and converts them with numpy. Anything not shaped as expected raises
naming the request, the position (and rank) and what was expected; nothing is padded or shifted. Nothing here
imports vLLM or SGLang.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

from verl_cppo.topk.rollout import TOPK_IDS, TOPK_LOG_PROBS, TOPK_REQUEST_KEY, _empty

__all__ = ["add_sglang_topk", "add_vllm_topk", "sglang_topk", "vllm_topk", "vllm_topk_request"]


def _check_k(k: int, engine: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{engine} top-K parsing needs K >= 1 (K = 0 means no top-K is requested), got K={k!r}")


def _int32_ids(ids: np.ndarray, where: str) -> np.ndarray:
    """int32 copy of token ids [n, k] after checking each is in [0, 2**31); names the first bad position."""
    bad = np.argwhere((ids < 0) | (ids > np.iinfo(np.int32).max))
    if len(bad):
        pos, rank = bad[0]
        raise ValueError(
            f"{where}: token id {int(ids[pos, rank])} at generated position {pos}, rank {rank + 1} is "
            "not an int32 vocabulary id"
        )
    return ids.astype(np.int32)


def vllm_topk_request(sampling_params: dict, k: int) -> None:
    """Turn verl's ``logprobs=True`` request into a top-K one (in place): ``logprobs=k`` and the array marker."""
    _check_k(k, "vLLM")
    sampling_params.pop("logprobs", None)
    sampling_params["logprobs"] = k
    sampling_params["extra_args"] = {**(sampling_params.get("extra_args") or {}), TOPK_REQUEST_KEY: k}


def vllm_topk(position_logprobs: Sequence[dict | None], k: int, request_id: str = "?") -> tuple[np.ndarray, np.ndarray]:
    """mu's top-K from vLLM's per-position logprob dicts (``CompletionOutput.logprobs`` of a ``logprobs=k`` request
    served without the array processor of ``verl_cppo.topk.vllm_arrays``).

    vLLM (0.24, ``vllm.logprobs.append_logprobs_for_next_position``) builds each position's dict
    ``{token_id: Logprob(logprob, rank)}`` from [sampled, top_1 .. top_k] in that order: k + 1 entries when the
    sampled token is not in the top-k (the first entry, whose rank may even tie with the k-th), k entries when it
    is (the dict keeps its first position, with the top-k rank). The top-k are thus the entries after the first
    when there are k + 1, all of them otherwise, ordered by rank. Returns ids int32 [n, k], log-probs float32.
    """
    _check_k(k, "vLLM")
    where = f"vLLM request {request_id!r}"
    n = len(position_logprobs)
    ids, lps = np.empty((n, k), dtype=np.int64), np.empty((n, k), dtype=np.float32)
    for i, entry in enumerate(position_logprobs):
        if not entry:
            raise ValueError(f"{where}: no logprobs at generated position {i}; requested logprobs={k}")
        items = list(entry.items())
        if len(items) == k + 1:
            items = items[1:]
        elif len(items) != k:
            raise ValueError(
                f"{where}: {len(items)} logprobs at generated position {i}; a logprobs={k} request gives "
                f"{k} (sampled token in the top-{k}) or {k + 1}"
            )
        try:
            items.sort(key=lambda item: item[1].rank)
            ids[i] = [token for token, _ in items]
            lps[i] = [logprob.logprob for _, logprob in items]
        except (TypeError, ValueError, AttributeError, OverflowError) as error:
            raise ValueError(
                f"{where}: malformed logprob entries at generated position {i} (expected {{int token id: "
                f"Logprob(float logprob, int rank)}}): {items!r}"
            ) from error
    return _int32_ids(ids, where), lps


def add_vllm_topk(extra_fields: dict, completion: Any, k: int, request_id: str = "?") -> list[float]:
    """Put mu's top-k of a vLLM answer into ``TokenOutput.extra_fields``; returns the sampled tokens' log-probs.

    ``completion`` is the final ``CompletionOutput`` of a request made by ``vllm_topk_request``. Its logprobs are
    ``TopKArrays`` (column 0 the sampled token, 1..k the top-k) when ``verl_cppo.topk.vllm_arrays`` is installed
    in this process; otherwise vLLM's per-position dicts, parsed by ``vllm_topk``. Either way every generated
    token must have its row, and a row's sampled token must be the generated one: the error names the request
    and the first position that breaks this. O(1) Python operations per answer on the array path.
    """
    _check_k(k, "vLLM")
    where = f"vLLM request {request_id!r}"
    token_ids = completion.token_ids
    logprobs = completion.logprobs
    n = len(token_ids)
    if logprobs is None or len(logprobs) != n:
        got = "none" if logprobs is None else len(logprobs)
        raise ValueError(
            f"{where}: top-{k} logprobs for {got} positions but {n} generated tokens (first missing position "
            f"{0 if logprobs is None else min(len(logprobs), n)}); expected one row per generated token"
        )
    if hasattr(logprobs, "arrays"):
        rows_ids, rows_lps = logprobs.arrays()  # [n, k + 1] each
        if rows_ids.shape[1] != k + 1:
            raise ValueError(f"{where}: top-K arrays have {rows_ids.shape[1] - 1} columns, expected K={k}")
        mismatch = np.flatnonzero(rows_ids[:, 0] != np.asarray(token_ids, dtype=np.int64))
        if len(mismatch):
            i = int(mismatch[0])
            raise ValueError(
                f"{where}: logprob row {i} is for token {int(rows_ids[i, 0])} but generated position {i} holds "
                f"token {token_ids[i]}; rows and tokens are misaligned"
            )
        extra_fields[TOPK_IDS], extra_fields[TOPK_LOG_PROBS] = rows_ids[:, 1:], rows_lps[:, 1:]
        return rows_lps[:, 0].tolist()
    extra_fields[TOPK_IDS], extra_fields[TOPK_LOG_PROBS] = vllm_topk(logprobs, k, request_id)
    try:
        return [logprobs[i][token_ids[i]].logprob for i in range(n)]
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{where}: a generated token has no logprob entry of its own: {error!r}") from error


def sglang_topk(meta_info: dict, num_tokens: int, k: int, request_id: str = "?") -> tuple[np.ndarray, np.ndarray]:
    """mu's top-K from SGLang's ``meta_info["output_top_logprobs"]`` of a ``top_logprobs_num=k`` request.

    SGLang (0.5.12, ``TokenizerManager.detokenize_top_logprobs_tokens``) gives one list per generated token of
    ``(logprob, token_id, text_or_None)`` tuples ranked best-first (text None: the Top-K request sets
    ``return_text_in_logprobs=False``). ``num_tokens`` is the number of token ids verl kept (0 when it dropped a
    mismatched answer). The tuples are unzipped in C (``zip``) and converted by numpy: O(1) Python operations per
    answer. A malformed entry raises naming the request, the position and the rank. Returns ids int32 [n, k],
    log-probs float32 [n, k].
    """
    _check_k(k, "SGLang")
    where = f"SGLang request {request_id!r}"
    if num_tokens == 0:
        return _empty(0, k)
    top = meta_info.get("output_top_logprobs") or []
    if len(top) != num_tokens:
        raise ValueError(
            f"{where}: output_top_logprobs for {len(top)} tokens but {num_tokens} output ids; "
            f"requested top_logprobs_num={k}"
        )
    counts = np.fromiter(map(len, (entries or () for entries in top)), dtype=np.int64, count=num_tokens)
    bad = np.flatnonzero(counts != k)
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{where}: {counts[i]} top logprobs at generated position {i}; requested {k}")
    flat = list(chain.from_iterable(top))  # n * k entries
    widths = np.fromiter(map(len, flat), dtype=np.int64, count=len(flat))
    bad = np.flatnonzero(widths != 3)
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{where}: top logprob entry {flat[i]!r} at generated position {i // k}, rank {i % k + 1} is not a "
            "(logprob, token_id, text) tuple"
        )
    columns = list(zip(*flat))  # (logprobs, token ids[, texts])
    lps = _numbers(columns[0], "fi", "logprob", where, k).astype(np.float32).reshape(num_tokens, k)
    ids = _numbers(columns[1], "i", "token id", where, k).reshape(num_tokens, k)
    return _int32_ids(ids, where), lps


def _numbers(column: Sequence, kinds: str, what: str, where: str, k: int) -> np.ndarray:
    """``column`` (n * k values, rank-major per position) as a numpy array of a kind in ``kinds`` ("i" / "fi");
    names the first value that is not such a number."""
    values = np.array(column)
    if values.dtype.kind in kinds or (values.dtype.kind == "u" and "i" in kinds):
        return values
    allowed = (int, np.integer) if kinds == "i" else (int, float, np.integer, np.floating)
    i = next(
        (j for j, v in enumerate(column) if not isinstance(v, allowed) or (isinstance(v, int) and abs(v) >= 2**63)), 0
    )
    raise ValueError(
        f"{where}: {what} {column[i]!r} at generated position {i // k}, rank {i % k + 1} is not a number of that kind"
    )


def add_sglang_topk(extra_fields: dict, meta_info: dict, num_tokens: int, k: int, request_id: str = "?") -> None:
    """Put mu's top-k of an SGLang answer into ``TokenOutput.extra_fields`` (no-op when k is 0)."""
    if k > 0:
        extra_fields[TOPK_IDS], extra_fields[TOPK_LOG_PROBS] = sglang_topk(meta_info, num_tokens, k, request_id)
