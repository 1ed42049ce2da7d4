"""Rollout side of the Top-K divergences: mu's top-K token ids and log-probs for every generated token.

Data flow (each step names the verl 0.9.1 function that ``patches/topk_*.diff`` extends, see patches/README.md):

    vLLM / SGLang server  generate(): asks the engine for K top log-probs (vLLM ``SamplingParams.logprobs=K``,
        SGLang ``top_logprobs_num=K``) and adds ``[n, K]`` numpy arrays to ``TokenOutput.extra_fields``
        (``vllm_topk`` / ``sglang_topk``)
    agent-loop worker    ``LLMServerClient.generate``: pops the arrays from every server answer and records them
        with the turn's token ids (``record_generation``) in a per-trajectory ``generation_recorder``, opened by
        ``AgentLoopWorker._run_agent_loop``; the async trainers' resume loop calls it once per partial answer
    TransferQueue put    ``AgentLoopWorkerTQ._agent_loop_postprocess``: ``response_topk_fields`` lines the
        recorded turns up with the response (runs of response_mask = 1 are generated tokens; tool / context
        tokens and trimmed turn ends get no entry) and stores ``rollout_topk_ids`` int32 ``[T, K]`` (-1 = no
        entry) and ``rollout_topk_log_probs`` float32 ``[T, K]`` next to ``rollout_log_probs``
    batch padding        ``construct_minimal_padding_template``: synthetic no-op samples get ``[1, K]`` empty rows

K reaches every process of the job through the environment variable VERL_CPPO_TOPK, set by the driver from
``actor_rollout_ref.actor.policy_loss.cppo.topk`` (``verl_cppo.topk.setup``). Nothing here imports vLLM or SGLang:
the server functions read the objects those engines hand to verl.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch

__all__ = [
    "ENV_TOPK",
    "TOPK_IDS",
    "TOPK_LOG_PROBS",
    "TOPK_REQUEST_KEY",
    "TOPK_ROLLOUTS",
    "Generation",
    "add_sglang_topk",
    "add_vllm_topk",
    "align_response_topk",
    "generation_recorder",
    "pad_topk_fields",
    "record_generation",
    "response_topk_fields",
    "rollout_topk",
    "sglang_topk",
    "vllm_topk",
    "vllm_topk_request",
]

logger = logging.getLogger(__name__)

ENV_TOPK = "VERL_CPPO_TOPK"
"""K of the Top-K divergence, set for every Ray process by the driver; unset = Top-K plumbing off."""

TOPK_IDS = "rollout_topk_ids"
"""Batch field: int32 [T, K] per response, mu's top-K token ids of each response token (-1 = no entry)."""

TOPK_LOG_PROBS = "rollout_topk_log_probs"
"""Batch field: float32 [T, K] per response, mu's log-probs of those ids (0 where the id is -1)."""


TOPK_REQUEST_KEY = "verl_cppo_topk"
"""``SamplingParams.extra_args`` key of a vLLM Top-K request: K, mu's top-K kept as arrays (``vllm_arrays``)."""

TOPK_ROLLOUTS = {"vllm", "sglang"}
"""``actor_rollout_ref.rollout.name`` values whose servers return mu's top-K (with the Top-K diffs)."""


def rollout_topk() -> int:
    """K from VERL_CPPO_TOPK, or 0 when the Top-K plumbing is off."""
    raw = os.environ.get(ENV_TOPK, "")
    if not raw:
        return 0
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(f"{ENV_TOPK} must be an int >= 1 (mu's top-K per token), got {raw!r}")
    return k


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -1, dtype=np.int32), np.zeros((n, k), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Agent loop: record every server answer of a trajectory, then line the turns up with the response
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One server answer: the prompt length it continued and the tokens it generated with their top-K."""

    prompt_len: int
    token_ids: list[int]
    topk_ids: np.ndarray  # [n, K] int32
    topk_log_probs: np.ndarray  # [n, K] float32


_RECORDER: ContextVar[list[Generation] | None] = ContextVar("verl_cppo_rollout_topk", default=None)
_warned_unrecorded = False


@contextmanager
def generation_recorder() -> Iterator[list[Generation]]:
    """Scope of one trajectory (one ``_run_agent_loop`` task): collects its server answers in order."""
    token = _RECORDER.set([])
    try:
        yield _RECORDER.get()
    finally:
        _RECORDER.reset(token)


def record_generation(prompt_ids: Sequence[int], output: Any) -> None:
    """Move the top-K arrays of a ``TokenOutput`` into the current trajectory's recorder.

    They are always taken out of ``extra_fields``, which verl would otherwise carry as non-tensor data.
    """
    global _warned_unrecorded
    ids = output.extra_fields.pop(TOPK_IDS, None)
    lps = output.extra_fields.pop(TOPK_LOG_PROBS, None)
    if ids is None:
        return
    recorder = _RECORDER.get()
    if recorder is None:
        if not _warned_unrecorded:
            _warned_unrecorded = True
            logger.warning("verl-cppo: rollout top-K answered outside an agent-loop trajectory; dropped")
        return
    tokens = list(output.token_ids)
    if len(ids) != len(tokens) or len(lps) != len(tokens):
        raise ValueError(f"rollout top-K has {len(ids)} rows for {len(tokens)} generated tokens")
    recorder.append(Generation(len(prompt_ids), tokens, np.asarray(ids), np.asarray(lps)))


def _turns(generations: Sequence[Generation]) -> list[Generation]:
    """Join answers that continue the previous one exactly (the async trainers' abort-and-resume)."""
    turns: list[Generation] = []
    for gen in generations:
        prev = turns[-1] if turns else None
        if prev is not None and gen.prompt_len == prev.prompt_len + len(prev.token_ids):
            turns[-1] = Generation(
                prev.prompt_len,
                prev.token_ids + gen.token_ids,
                np.concatenate([prev.topk_ids, gen.topk_ids]),
                np.concatenate([prev.topk_log_probs, gen.topk_log_probs]),
            )
        else:
            turns.append(gen)
    return turns


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of nonzero entries."""
    runs, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


def align_response_topk(
    response_ids: Sequence[int], response_mask: Sequence[int], generations: Sequence[Generation], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Line recorded answers up with a response: ids int32 [T, k] (-1 = no entry), log-probs float32 [T, k].

    Generated tokens are the runs of response_mask = 1. Each run continues the turn that matched last or starts
    at a later turn whose tokens begin with the run's tokens (a turn may lose its tail to the response length or
    to a chat-template merge, and a run may span two turns that nothing separates). Token ids are compared, so
    a misalignment raises instead of attaching another token's distribution.
    """
    response_ids = [int(t) for t in response_ids]
    ids, lps = _empty(len(response_ids), k)
    turns = _turns(generations)
    nxt = 0
    for start, end in _runs(response_mask):
        pos = start
        while pos < end:
            for j in range(nxt, len(turns)):
                m = min(len(turns[j].token_ids), end - pos)
                if m > 0 and turns[j].token_ids[:m] == response_ids[pos : pos + m]:
                    break
            else:
                raise ValueError(
                    f"rollout top-K: generated tokens at response positions [{pos}, {end}) match no recorded "
                    f"server answer (turns {nxt}..{len(turns) - 1} of {len(turns)}); was the response edited "
                    "after generation?"
                )
            if turns[j].topk_ids.shape[-1] != k:
                raise ValueError(f"rollout top-K: server returned K={turns[j].topk_ids.shape[-1]}, expected {k}")
            ids[pos : pos + m] = turns[j].topk_ids[:m]
            lps[pos : pos + m] = turns[j].topk_log_probs[:m]
            pos += m
            nxt = j + 1
    return ids, lps


def response_topk_fields(output: Any, k: int | None = None) -> dict[str, torch.Tensor]:
    """Batch fields ``rollout_topk_ids`` / ``rollout_topk_log_probs`` of one ``AgentLoopOutput`` ({} when off)."""
    k = rollout_topk() if k is None else k
    if k == 0:
        return {}
    recorder = _RECORDER.get()
    generated = any(output.response_mask)
    if generated and not recorder:
        raise RuntimeError(
            f"{ENV_TOPK}={k} but no rollout top-K was recorded for this trajectory: the rollout server did not "
            "return it (is verl-cppo installed, and its Top-K patches applied, in the rollout server processes?)"
        )
    ids, lps = align_response_topk(output.response_ids, output.response_mask, recorder or [], k)
    return {TOPK_IDS: torch.from_numpy(ids), TOPK_LOG_PROBS: torch.from_numpy(lps)}


def pad_topk_fields(sample: dict, response_length: int) -> None:
    """Give a synthetic padding sample empty top-K rows of its own response length (in place)."""
    if TOPK_IDS not in sample:
        return
    k = sample[TOPK_IDS].shape[-1]
    sample[TOPK_IDS] = torch.full((response_length, k), -1, dtype=torch.int32)
    sample[TOPK_LOG_PROBS] = torch.zeros((response_length, k), dtype=torch.float32)
