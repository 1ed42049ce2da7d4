"""Token-in, token-out sampling with an HF causal LM on CPU, returning what verl's rollout contract needs.

One request at a time (batch 1, KV cache): a request's tokens and log-probs never depend on which other
requests the server happens to be serving, so a per-request seed makes sampling reproducible whatever the
arrival order of verl's concurrent agent-loop requests.

Log-probs are those of the distribution the trainer calls pi at the same temperature:
``log_softmax(logits / temperature)`` over the full vocabulary, at the sampled token (verl's actor computes
exactly this in ``compute_log_prob``). With top-k / top-p the token is drawn from the truncated
distribution but the full-vocabulary log-prob is reported, as vLLM does by default. Temperature 0 is greedy
decoding with the log-probs of ``log_softmax(logits)``.

The result is a ``SampledTokens`` record with per-token fields; a further per-token output (e.g. mu's top-K
ids and log-probs for Top-K divergences) is one more field filled in the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SampledTokens", "sample_tokens"]


@dataclass
class SampledTokens:
    token_ids: list[int]
    """Response tokens, the stop token included when one was sampled."""
    log_probs: list[float]
    """log mu(token_t | prefix) of each response token, same length as token_ids."""
    stopped: bool
    """True if a stop token ended the response, False if it hit max_new_tokens."""


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[V] logits with everything outside the top-k / nucleus set to -inf."""
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]  # scalar
        logits = logits.masked_fill(logits < kth, float("-inf"))  # [V]
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # [V], [V]
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)  # [V]
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # [V] keeps the first token
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return logits


@torch.no_grad()
def sample_tokens(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_token_ids: set[int],
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
) -> SampledTokens:
    """Sample up to ``max_new_tokens`` tokens after ``prompt_ids`` from ``model`` (an HF causal LM)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, P]
    out = model(input_ids=input_ids, use_cache=True)
    token_ids: list[int] = []
    log_probs: list[float] = []
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float()  # [V]
        if temperature > 0:
            logits = logits / temperature
            log_pi = torch.log_softmax(logits, dim=-1)  # [V]
            weights = torch.softmax(_filter_logits(logits, top_k, top_p), dim=-1)  # [V]
            token = int(torch.multinomial(weights, 1, generator=generator))
        else:
            log_pi = torch.log_softmax(logits, dim=-1)  # [V]
            token = int(torch.argmax(logits))
        token_ids.append(token)
        log_probs.append(float(log_pi[token]))
        if token in stop_token_ids:
            return SampledTokens(token_ids, log_probs, stopped=True)
        next_ids = torch.tensor([[token]], dtype=torch.long, device=device)  # [1, 1]
        out = model(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)
    return SampledTokens(token_ids, log_probs, stopped=False)
