"""CPPO through verl's real loss path on a tiny model, on CPU, in a few seconds.

A random-initialised tiny Qwen2 (built from a config: nothing is downloaded) samples responses; its log-probs
at sampling time are the rollout policy mu. The same model is then trained for a few steps with AdamW on
verl's ``ppo_loss`` (the function every verl 0.9.1 engine calls) with ``loss_mode=cppo``, fed the model's
per-token log-probs as the engine emits them (nested, prompt + response). As pi drifts from mu the
position-weighted threshold and the prefix budget mask more and more tokens, and the printout shows how
many and why.

The columns are explained by LEGEND, printed above the table.

    python examples/cpu_loss_demo.py [--steps 12] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
from dataclasses import fields

import torch
from tensordict import TensorDict
from transformers import Qwen2Config, Qwen2ForCausalLM
from verl.utils import tensordict_utils as tu
from verl.workers.config import FSDPActorConfig
from verl.workers.utils.losses import ppo_loss

from verl_cppo import CPPOConfig, CPPOPolicyLossConfig

LEGEND = """\
  A>0 / A<0   mean log(pi / mu) on the tokens of responses with a positive / negative advantage: training
              works when the first rises and the second falls.
  surrogate   the value of the loss CPPO hands verl, - sum_t M_t sg(min(rho_t, ratio_cap)) A_t log pi_t
              (normalised). It is a surrogate whose GRADIENT is the policy gradient; its value is not an
              objective and may rise while training improves (rho grows on the tokens it reinforces).
  masked      share of response tokens CPPO dropped from the gradient, split into the share dropped by the
              prefix budget and by the position-weighted token threshold.
  rho_max     the largest ratio pi / mu over all response tokens. It may exceed ratio_cap: ratio_cap caps
              the ratio's coefficient in the loss (trunc = share of tokens capped), not the ratio itself.
"""


def tiny_model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.3,
    )
    return Qwen2ForCausalLM(config)


def token_log_probs(model, sequences: torch.Tensor) -> torch.Tensor:
    """log pi(x_{j+1} | x_<=j) for every position j: [B, L] -> [B, L - 1]."""
    logits = model(sequences).logits[:, :-1].float()  # [B, L-1, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, sequences[:, 1:, None]).squeeze(-1)  # [B, L-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=6)
    parser.add_argument("--response-len", type=int, default=48)
    args = parser.parse_args()

    model = tiny_model(seed=0)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 128, (args.batch, args.prompt_len), generator=gen)  # [B, P]
    with torch.no_grad():
        sequences = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            max_new_tokens=args.response_len,
            min_new_tokens=args.response_len,
            pad_token_id=0,
            eos_token_id=None,
        )  # [B, P + R]
        log_mu = token_log_probs(model, sequences)[:, args.prompt_len - 1 :]  # [B, R] rollout log-probs
    responses = sequences[:, args.prompt_len :]  # [B, R]
    advantages = torch.randn(args.batch, 1, generator=gen).sign().expand(-1, args.response_len)  # [B, R]

    config = FSDPActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_mini_batch_size=args.batch,
        ppo_micro_batch_size_per_gpu=args.batch,
        loss_agg_mode="seq-mean-token-sum-norm",
        loss_scale_factor=args.response_len,
        policy_loss=CPPOPolicyLossConfig(loss_mode="cppo", cppo=CPPOConfig()),
    )
    nested = lambda rows: torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)  # noqa: E731
    data = TensorDict(
        {
            "prompts": nested(prompts),
            "responses": nested(responses),
            "response_mask": nested(torch.ones_like(responses)),
            "old_log_probs": nested(log_mu),
            "advantages": nested(advantages.float()),
        },
        batch_size=[args.batch],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=responses.numel(), global_batch_size=args.batch)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    cppo = config.policy_loss.cppo
    settings = ", ".join(f"{f.name}={getattr(cppo, f.name)}" for f in fields(cppo) if f.name != "_target_")
    print(f"tiny Qwen2, {args.batch} responses x {args.response_len} tokens; CPPO (paper defaults): {settings}")
    print(LEGEND)
    print()
    header = "step   A>0      A<0     surrogate  masked  by_budget  by_token  delta_b  mean_D   rho_max  trunc"
    print(header)
    positive = advantages[:, 0] > 0  # [B]
    for step in range(args.steps):
        full = token_log_probs(model, sequences)  # [B, P + R - 1]
        # the engine's output layout: one nested row per sequence, log-prob of token j+1 at position j
        log_probs = torch.nested.as_nested_tensor(list(torch.cat([full, full[:, :1]], dim=1)), layout=torch.jagged)
        loss, metrics = ppo_loss(config, {"log_probs": log_probs}, data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        m = {k.split("/")[-1]: (v.values[0] if hasattr(v, "values") else v) for k, v in metrics.items()}
        log_ratio = (full[:, args.prompt_len - 1 :] - log_mu).detach()  # [B, R] log(pi / mu) before this update
        up, down = log_ratio[positive].mean().item(), log_ratio[~positive].mean().item()
        print(
            f"{step:4d}  {up:+.4f}  {down:+.4f}  {float(m['pg_loss']):+8.4f}   {m['cppo_masked_frac']:.4f}  "
            f"{m['cppo_masked_by_budget_share']:.4f}     {m['cppo_masked_by_token_share']:.4f}    "
            f"{m['cppo_delta_b_mean']:.4f}   {m['cppo_div_mean']:.4f}  {m['cppo_rho_max']:7.2f}  "
            f"{m['cppo_ratio_truncated_frac']:.4f}"
        )
    print(
        f"\nratio_cap = {cppo.ratio_cap:g}: rho_max above it is expected once pi has moved; the loss used "
        "min(rho, ratio_cap) as those tokens' coefficient (trunc column)."
    )


if __name__ == "__main__":
    main()
