"""Rollout side of the Top-K divergences: mu's top-K token ids and log-probs for every generated token.

Data flow (each step names the verl 0.9.1 function that ``patches/topk_*.diff`` extends, see patches/README.md):

    vLLM / SGLang server  generate(): asks the engine for K top log-probs (vLLM ``SamplingParams.logprobs=K``,
        SGLang ``top_logprobs_num=K``) and adds ``[n, K]`` numpy arrays to ``TokenOutput.extra_fields``
        (``verl_cppo.topk.servers``; vLLM's frontend keeps them as arrays: ``verl_cppo.topk.vllm_arrays``)
    agent-loop worker    ``LLMServerClient.generate``: pops the arrays from every server answer and records them
        with the turn's token ids (``record_generation``) in a per-trajectory ``generation_recorder``, opened by
        ``AgentLoopWorker._run_agent_loop``; the async trainers' resume loop calls it once per partial answer
    TransferQueue put    ``AgentLoopWorkerTQ._agent_loop_postprocess`` (v1 trainer): ``response_topk_fields`` lines
        the recorded turns up with the response (runs of response_mask = 1 are generated tokens; tool / context
        tokens and trimmed turn ends get no entry) and stores ``rollout_topk_ids`` int32 ``[T, K]`` (-1 = no
        entry) and ``rollout_topk_log_probs`` float32 ``[T, K]`` next to ``rollout_log_probs``
    batch padding        ``construct_minimal_padding_template``: synthetic no-op samples get ``[1, K]`` empty rows
    DataProto batch      ``AgentLoopWorker._agent_loop_postprocess`` / ``_postprocess`` (legacy trainer, wrapped by
        ``padded_topk_postprocess`` / ``topk_into_batch``): the same fields right-padded to the response length
        like ``rollout_log_probs`` (``[1, response_length, K]``, -1 / 0 on padding), carried to ``_postprocess`` in
        the output's ``extra_fields`` and concatenated into the batch as ``[B, response_length, K]``

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
from functools import wraps
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
    "align_response_topk",
    "generation_recorder",
    "pad_topk_fields",
    "padded_topk_postprocess",
    "record_generation",
    "response_topk_fields",
    "rollout_topk",
    "topk_into_batch",
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


# ----------------------------------------------------------------------------------------------------------------
# The legacy trainer's DataProto agent loop: the same fields, right-padded like rollout_log_probs
# ----------------------------------------------------------------------------------------------------------------


def padded_topk_postprocess(original):
    """Wrapper of ``AgentLoopWorker._agent_loop_postprocess`` (one trajectory, inside its ``generation_recorder``):
    after verl's padding, the trajectory's top-K fields right-padded to the padded response's width W go into the
    output's ``extra_fields`` (ids int32 ``[1, W, K]`` -1 on padding, log-probs float32 ``[1, W, K]`` 0)."""

    @wraps(original)
    async def postprocess(self, output, validate, **kwargs):
        fields = response_topk_fields(output)  # {} when off; [T, K] each
        padded = await original(self, output, validate, **kwargs)
        if fields:
            width = padded.response_ids.shape[-1]
            ids, lps = _empty(width, fields[TOPK_IDS].shape[-1])
            length = fields[TOPK_IDS].shape[0]
            if length > width:
                raise ValueError(f"rollout top-K has {length} rows for a response padded to {width} tokens")
            ids[:length], lps[:length] = fields[TOPK_IDS].numpy(), fields[TOPK_LOG_PROBS].numpy()  # [W, K] each
            padded.extra_fields[TOPK_IDS] = torch.from_numpy(ids)[None]  # [1, W, K] int32
            padded.extra_fields[TOPK_LOG_PROBS] = torch.from_numpy(lps)[None]  # [1, W, K] float32
        return padded

    return postprocess


def topk_into_batch(original):
    """Wrapper of ``AgentLoopWorker._postprocess`` (the trajectories into one ``DataProto``): moves the padded top-K
    rows out of each output's ``extra_fields`` (verl would make them object arrays of the non-tensor batch) and
    into the batch, ``[B, W, K]`` next to ``rollout_log_probs`` ``[B, W]``."""

    @wraps(original)
    def postprocess(self, inputs, *args, **kwargs):
        rows = [(item.extra_fields.pop(TOPK_IDS, None), item.extra_fields.pop(TOPK_LOG_PROBS, None)) for item in inputs]
        batch = original(self, inputs, *args, **kwargs)
        carried = sum(ids is not None for ids, _ in rows)
        if carried == 0:
            return batch
        if carried < len(rows):
            raise RuntimeError(
                f"rollout top-K: {len(rows) - carried} of {len(rows)} trajectories carry no top-K rows (a custom agent "
                "loop that bypasses AgentLoopWorker._agent_loop_postprocess?)"
            )
        batch.batch[TOPK_IDS] = torch.cat([ids for ids, _ in rows])  # [B, W, K] int32
        batch.batch[TOPK_LOG_PROBS] = torch.cat([lps for _, lps in rows])  # [B, W, K] float32
        return batch

    return postprocess
