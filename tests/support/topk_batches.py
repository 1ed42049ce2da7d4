"""Engine micro-batches with mu's top-K, and the float64 full-vocabulary reference D of each response token
(``tests.support.topk_reference.reference_topk_row``, the repository's one loop reference of the Top-K formulas).

mu's logits are pi's plus noise and each response token is sampled from mu, so sampled tokens fall inside and
outside mu's top-K. Shares no code with verl_cppo.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu

from tests.support.float32_bounds import topk_divergence_bound
from tests.support.topk_reference import reference_topk_row


def _nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def topk_micro_batch(gen: torch.Generator, prompt_lens, resp_lens, *, vocab=40, k=5, spread=0.7, holes=0.15):
    """A v1 actor micro-batch with mu's top-K, and pi's logits of its packed token stream.

    mu's logits are pi's plus noise; each response token is sampled from mu, so it lies inside or outside mu's
    top-k. Returns (data, pi_logits [nnz, V] float64, ref) where ref holds [B, T] padded rows (T = longest
    response): ``old`` = log mu(sampled) (bypass mode: old_log_probs = rollout_log_probs), ``new`` = log pi,
    ``adv``, ``mask`` and the inputs of ``reference_topk_row`` per response token.
    """
    batch, width = len(prompt_lens), max(resp_lens)
    seqs, pi_rows = [], []
    ref = {"old": torch.zeros(batch, width, dtype=torch.float64), "new": torch.zeros(batch, width, dtype=torch.float64)}
    ref["mask"] = torch.zeros(batch, width, dtype=torch.bool)
    ref["rows"] = [[None] * width for _ in range(batch)]
    topk_ids, topk_lps, mu_sampled, responses, prompts, masks = [], [], [], [], [], []
    for b, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        pi = 2.0 * torch.randn(p + r, vocab, generator=gen, dtype=torch.float64)
        mu = pi + spread * torch.randn(p + r, vocab, generator=gen, dtype=torch.float64)
        prompt = torch.randint(0, vocab, (p,), generator=gen)
        mu_lp = torch.log_softmax(mu, dim=-1)
        resp, ids, lps, mus = [], [], [], []
        for t in range(r):
            row = p - 1 + t  # logits row predicting response token t
            token = int(torch.multinomial(mu_lp[row].exp(), 1, generator=gen))
            top = torch.topk(mu_lp[row], k)
            resp.append(token)
            ids.append(top.indices.to(torch.int32))
            lps.append(top.values.float())
            mus.append(float(mu_lp[row, token]))
        resp = torch.tensor(resp, dtype=torch.long)
        seq = torch.cat([prompt, resp])
        pi_lp = torch.log_softmax(pi, dim=-1)
        mask = torch.rand(r, generator=gen) > holes
        mask[0] = True
        for t in range(r):
            row = p - 1 + t
            ref["old"][b, t] = mus[t]
            ref["new"][b, t] = pi_lp[row, resp[t]]
            ref["mask"][b, t] = bool(mask[t])
            ref["rows"][b][t] = (pi[row].tolist(), int(resp[t]), ids[t].tolist(), lps[t].tolist(), mus[t])
        seqs.append(seq), pi_rows.append(pi), prompts.append(prompt), responses.append(resp), masks.append(mask)
        topk_ids.append(torch.stack(ids)), topk_lps.append(torch.stack(lps))
        mu_sampled.append(torch.tensor(mus, dtype=torch.float32))
    adv = torch.randn(batch, 1, generator=gen, dtype=torch.float64).expand(batch, width).clone()
    ref["adv"] = adv
    data = TensorDict(
        {
            "input_ids": _nested(seqs),
            "prompts": _nested(prompts),
            "responses": _nested(responses),
            "response_mask": _nested([m.long() for m in masks]),
            "rollout_log_probs": _nested(mu_sampled),
            "old_log_probs": _nested([m.double() for m in mu_sampled]),
            "advantages": _nested([adv[b, :r] for b, r in enumerate(resp_lens)]),
            "rollout_topk_ids": _nested(topk_ids),
            "rollout_topk_log_probs": _nested(topk_lps),
        },
        batch_size=[batch],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(ref["mask"].sum()), global_batch_size=batch)
    return data, torch.cat(pi_rows), ref


def ref_divergences(ref, kind: str) -> torch.Tensor:
    """[B, T] float64 reference D of every response token (0 on padding)."""
    out = torch.zeros(ref["old"].shape, dtype=torch.float64)
    for b, row in enumerate(ref["rows"]):
        for t, entry in enumerate(row):
            if entry is not None:
                out[b, t] = reference_topk_row(*entry, kind)
    return out


def ref_divergence_bounds(ref, kind: str, expected: torch.Tensor) -> torch.Tensor:
    """[B, T] float64 bound on |D - reference D| for the hook's float32 D of every response token (0 on padding):
    ``tests.support.float32_bounds.topk_divergence_bound`` of the token's pi logits row."""
    out = torch.zeros(expected.shape, dtype=torch.float64)
    for b, row in enumerate(ref["rows"]):
        for t, entry in enumerate(row):
            if entry is not None:
                logits = torch.tensor(entry[0], dtype=torch.float64)[None]  # [1, V]
                out[b, t] = topk_divergence_bound(logits, kind, expected[b, t].reshape(1))[0]
    return out


def pi_log_probs_nested(data, pi_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's nested per-token log pi(next token) over the packed stream, and its values leaf (grad)."""
    ids = data["input_ids"].values()
    offsets = data["input_ids"].offsets()
    labels = torch.roll(ids, -1)
    values = torch.log_softmax(pi_logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    values = values.detach().clone().requires_grad_(True)
    return torch.nested.nested_tensor_from_jagged(values, offsets=offsets), values


def legacy_micro_batch(data):
    """The same micro-batch as the legacy trainer's actor update hands it to the engine: the DataProto batch's
    left-padded prompts and right-padded response fields (pads: id 0, top-K id -1, log-prob 0), put through verl's
    own ``left_right_2_no_padding`` (which packs only ``input_ids`` / ``position_ids``)."""
    from verl.workers.utils.padding import left_right_2_no_padding

    prompts = [p for p in data["prompts"].unbind()]
    responses = [r for r in data["responses"].unbind()]
    batch, p_max, r_max = len(prompts), max(len(p) for p in prompts), max(len(r) for r in responses)

    def right(key, value=0):
        rows = data[key].unbind()
        out = torch.full((batch, r_max, *rows[0].shape[1:]), value, dtype=rows[0].dtype)
        for b, row in enumerate(rows):
            out[b, : len(row)] = row
        return out

    left_prompts = torch.zeros(batch, p_max, dtype=torch.long)
    attention_mask = torch.zeros(batch, p_max + r_max, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        left_prompts[b, p_max - len(p) :] = p
        attention_mask[b, p_max - len(p) : p_max + len(r)] = 1
    padded = {key: right(key) for key in ("responses", "response_mask", "rollout_log_probs", "old_log_probs")}
    padded["advantages"] = right("advantages")
    padded["rollout_topk_ids"] = right("rollout_topk_ids", -1)
    padded["rollout_topk_log_probs"] = right("rollout_topk_log_probs")
    td = TensorDict(
        {
            **padded,
            "prompts": left_prompts,
            "input_ids": torch.cat([left_prompts, padded["responses"]], dim=1),
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
        },
        batch_size=[batch],
    )
    td = left_right_2_no_padding(td)
    global_info = {key: data[key] for key in ("dp_size", "batch_num_tokens", "global_batch_size")}
    tu.assign_non_tensor(td, **global_info)
    return td
