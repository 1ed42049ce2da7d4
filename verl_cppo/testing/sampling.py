"""Token-in, token-out sampling with an HF causal LM on CPU, returning what verl's rollout contract needs.

``sample_batch`` decodes a batch of prompts of one length together (no padding, one KV cache), each row with
its own ``torch.Generator`` and its own token budget. A row's tokens and log-probs do not depend on which
other rows share its batch: rows never interact (no padding, no shared randomness) and a CPU forward of
equal-length rows computes each row as it would alone (``tests/test_cpu_rollout.py`` checks this). So with
a per-request seed, sampling is reproducible whatever the arrival order of verl's concurrent requests.

Log-probs are those of the distribution the trainer calls pi at the same temperature:
``log_softmax(logits / temperature)`` over the full vocabulary, at the sampled token (verl's actor computes
exactly this in ``compute_log_prob``). With top-k / top-p the token is drawn from the truncated
distribution but the full-vocabulary log-prob is reported, as vLLM does by default. Temperature 0 is greedy
decoding with the log-probs of ``log_softmax(logits)``.

The result is one ``SampledTokens`` record per row with per-token fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["SampledTokens", "sample_batch"]


@dataclass
class SampledTokens:
    token_ids: list[int] = field(default_factory=list)
    """Response tokens, the stop token included when one was sampled."""
    log_probs: list[float] = field(default_factory=list)
    """log mu(token_t | prefix) of each response token, same length as token_ids."""
    stopped: bool = False
    """True if a stop token ended the response, False if it used its whole token budget."""


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[B, V] logits with everything outside each row's top-k / nucleus set to -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # [B, V]
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        probs = torch.softmax(sorted_logits, dim=-1)  # [B, V]
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # [B, V]; the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [B, V]
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample_batch(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: list[int],
    stop_token_ids: set[int],
    generators: list[torch.Generator],
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
) -> list[SampledTokens]:
    """Sample a response for each prompt (all of one length) from ``model`` (an HF causal LM)."""
    batch = len(prompts)
    if not batch or len({len(p) for p in prompts}) != 1 or not prompts[0]:
        raise ValueError(f"sample_batch needs non-empty prompts of one length, got lengths {[len(p) for p in prompts]}")
    if len(max_new_tokens) != batch or len(generators) != batch or min(max_new_tokens) < 1:
        raise ValueError(f"need one generator and a budget >= 1 per prompt, got budgets {max_new_tokens}")
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor(prompts, dtype=torch.long, device=device), use_cache=True)  # logits [B, P, V]
    results = [SampledTokens() for _ in range(batch)]
    active = list(range(batch))
    for _ in range(max(max_new_tokens)):
        logits = out.logits[:, -1].float()  # [B, V]
        if temperature > 0:
            logits = logits / temperature
            weights = torch.softmax(_filter_logits(logits, top_k, top_p), dim=-1)  # [B, V]
        log_pi = torch.log_softmax(logits, dim=-1)  # [B, V]
        next_ids = torch.zeros(batch, 1, dtype=torch.long)  # [B, 1]; finished rows keep decoding, ignored
        for row in active:
            if temperature > 0:
                token = int(torch.multinomial(weights[row], 1, generator=generators[row]))
            else:
                token = int(torch.argmax(logits[row]))
            next_ids[row, 0] = token
            result = results[row]
            result.token_ids.append(token)
            result.log_probs.append(float(log_pi[row, token]))
            result.stopped = token in stop_token_ids
        active = [r for r in active if not results[r].stopped and len(results[r].token_ids) < max_new_tokens[r]]
        if not active:
            break
        out = model(input_ids=next_ids.to(device), past_key_values=out.past_key_values, use_cache=True)
    return results
