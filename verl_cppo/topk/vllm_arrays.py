"""mu's top-K from vLLM kept as the arrays the EngineCore sends: no per-token Python objects, no token strings.

vLLM's EngineCore computes, for every generated position of a ``logprobs=K`` request, the sampled token and the
top-K (``LogprobsLists``: token ids and log-probs ``[m, max_K + 1]``, column 0 the sampled token, columns 1..K the
top-K best-first, numpy arrays). Its frontend's ``LogprobsProcessor`` then turns each position into a dict of
K + 1 ``Logprob`` objects and, with a tokenizer (verl's server runs with one), decodes every one of the K + 1
ids into a string. At K = 20 that costs ~150 us of frontend CPU and ~5 KB of Python objects per generated token.

A request that carries ``SamplingParams.extra_args[TOPK_REQUEST_KEY] = K`` (verl's server with the Top-K diff
sends it) gets a ``TopKLogprobsProcessor`` instead: each engine step copies the request's rows into int32 /
float32 blocks (``TopKArrays``, 8 * (K + 1) bytes per token), a few Python operations per step whatever K is.
The tokenizer still detokenizes the generated text (stop strings, ``CompletionOutput.text``) exactly as
before; only the log-prob entries are never decoded. Requests without the key keep vLLM's processor untouched.

The processor is chosen by a ``verl_cppo.hooks`` wrapper of ``LogprobsProcessor.from_new_request`` (installed by
``verl_cppo.topk.setup.install_topk_runtime``), the one place where vLLM's output processor creates it. This
module is imported only where vLLM is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from vllm.v1.engine.logprobs import LogprobsProcessor

from verl_cppo.topk.rollout import TOPK_REQUEST_KEY

__all__ = ["TOPK_REQUEST_KEY", "TopKArrays", "TopKLogprobsProcessor", "topk_of_request", "wrap_from_new_request"]

BLOCK_ROWS = 256
"""Rows per storage block: a request holds at most BLOCK_ROWS - 1 unused rows."""


class TopKArrays:
    """The sampled token and top-K of each generated position of one request, in blocks of BLOCK_ROWS rows.

    Stands where vLLM keeps a request's sample logprobs (``CompletionOutput.logprobs``): ``len`` is the number
    of positions, slicing and ``extend`` serve vLLM's DELTA output mode. ``arrays()`` gives token ids int32
    [n, K + 1] and log-probs float32 [n, K + 1], column 0 the sampled token, columns 1..K the top-K best-first.
    """

    def __init__(self, request_id: str, k: int, max_tokens: int | None = None):
        self.request_id = request_id
        self.k = k
        self._rows = max(1, min(BLOCK_ROWS, max_tokens or BLOCK_ROWS))
        self._ids: list[np.ndarray] = []  # blocks [rows, K + 1] int32
        self._lps: list[np.ndarray] = []  # blocks [rows, K + 1] float32
        self._fill = self._rows  # rows used in the last block (full: a new block on the next append)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, token_ids: Any, logprobs: Any) -> None:
        """Add the rows of one engine step: token ids and log-probs [m, >= K + 1] (extra columns are other
        requests' larger K in the same batch)."""
        token_ids, logprobs = np.asarray(token_ids), np.asarray(logprobs)
        width = self.k + 1
        if token_ids.ndim != 2 or token_ids.shape[1] < width or logprobs.shape != token_ids.shape:
            raise ValueError(
                f"vLLM request {self.request_id!r}: at generated position {self._n} the engine sent top log-prob "
                f"arrays of shapes {token_ids.shape} (ids) and {logprobs.shape} (log-probs); expected [m, >= {width}]"
                f" (the sampled token, then the top-{self.k})"
            )
        done, m = 0, len(token_ids)
        while done < m:
            if self._fill == self._rows:
                self._ids.append(np.empty((self._rows, width), dtype=np.int32))
                self._lps.append(np.empty((self._rows, width), dtype=np.float32))
                self._fill = 0
            take = min(m - done, self._rows - self._fill)
            self._ids[-1][self._fill : self._fill + take] = token_ids[done : done + take, :width]
            self._lps[-1][self._fill : self._fill + take] = logprobs[done : done + take, :width]
            self._fill += take
            done += take
        self._n += m

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Token ids int32 [n, K + 1] and log-probs float32 [n, K + 1] (views of the storage when it is one block)."""
        if not self._ids:
            width = self.k + 1
            return np.empty((0, width), dtype=np.int32), np.empty((0, width), dtype=np.float32)
        if len(self._ids) == 1:
            return self._ids[0][: self._n], self._lps[0][: self._n]
        return np.concatenate(self._ids)[: self._n], np.concatenate(self._lps)[: self._n]

    @property
    def nbytes(self) -> int:
        """Bytes of the storage blocks."""
        return sum(block.nbytes for block in self._ids) + sum(block.nbytes for block in self._lps)

    def extend(self, other: TopKArrays) -> None:
        """Append another's positions (vLLM's DELTA outputs being merged)."""
        ids, lps = other.arrays()
        if len(ids):
            self.append(ids, lps)

    def __getitem__(self, index: slice) -> TopKArrays:
        if not isinstance(index, slice):
            raise TypeError(f"TopKArrays of vLLM request {self.request_id!r} is sliced by position ranges only")
        ids, lps = self.arrays()
        part = TopKArrays(self.request_id, self.k, max(1, len(ids[index])))
        if len(ids[index]):
            part.append(ids[index], lps[index])
        return part


class TopKLogprobsProcessor(LogprobsProcessor):
    """vLLM's per-request log-prob processor, with the sample logprobs kept as ``TopKArrays``."""

    def _update_sample_logprobs(self, logprobs_lists) -> None:
        token_ids, logprobs = logprobs_lists[0], logprobs_lists[1]  # [m, max_K + 1] each
        self.logprobs.append(token_ids, logprobs)
        column = logprobs[:, 0]  # [m] the sampled tokens' log-probs
        self.cumulative_logprob += float(column[0]) if len(column) == 1 else float(column.sum())


def topk_of_request(sampling_params: Any) -> int:
    """K when the request asks for mu's top-K as arrays, else 0."""
    extra = getattr(sampling_params, "extra_args", None)
    if not extra or TOPK_REQUEST_KEY not in extra:
        return 0
    k = extra[TOPK_REQUEST_KEY]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or sampling_params.logprobs != k:
        raise ValueError(
            f"SamplingParams.extra_args[{TOPK_REQUEST_KEY!r}] must be an int K >= 1 equal to logprobs; got "
            f"{k!r} with logprobs={sampling_params.logprobs!r}"
        )
    return k


def wrap_from_new_request(original):
    """``hooks.wrap`` factory for ``LogprobsProcessor.from_new_request``: Top-K requests get the array processor."""

    def from_new_request(tokenizer, request):
        processor = original(tokenizer=tokenizer, request=request)
        k = topk_of_request(request.sampling_params)
        if not k:
            return processor
        request_id = getattr(request, "external_req_id", None) or request.request_id
        return TopKLogprobsProcessor(
            tokenizer=processor.tokenizer,  # still decodes prompt logprobs, if any, as vLLM does
            logprobs=TopKArrays(request_id, k, request.sampling_params.max_tokens),
            prompt_logprobs=processor.prompt_logprobs,
            cumulative_logprob=0.0,
            num_logprobs=k,
            num_prompt_logprobs=processor.num_prompt_logprobs,
        )

    return from_new_request
