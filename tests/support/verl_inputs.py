"""Build inputs the way verl 0.9.1 hands them to a policy loss (no mocks: verl's own config classes)."""

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.config import FSDPActorConfig, McoreActorConfig, PolicyLossConfig

from verl_cppo.config import CPPOConfig, CPPOPolicyLossConfig

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def actor_config(loss_agg_mode="token-mean", cppo=None, loss_mode="cppo", engine="fsdp", **kw):
    """A worker-side actor config as ``omega_conf_to_dataclass`` builds it."""
    if cppo is None:
        policy_loss = PolicyLossConfig(loss_mode=loss_mode)
    else:
        cppo = cppo if isinstance(cppo, CPPOConfig) else CPPOConfig(**cppo)
        policy_loss = CPPOPolicyLossConfig(loss_mode=loss_mode, cppo=cppo)
    cls, strategy = (FSDPActorConfig, "fsdp") if engine == "fsdp" else (McoreActorConfig, "megatron")
    return cls(
        strategy=strategy,
        rollout_n=1,
        ppo_mini_batch_size=4,
        ppo_micro_batch_size_per_gpu=2,
        policy_loss=policy_loss,
        loss_agg_mode=loss_agg_mode,
        **kw,
    )


def _nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def engine_micro_batch(old, new, adv, mask, prompt_lens, *, global_tokens=None, global_seqs=None, dp_size=1):
    """A v1-trainer micro-batch: nested responses, and the engine's nested per-token log-probs.

    old/new/adv/mask are [B, T] padded rows; the response of row b is its first `resp_len[b]` columns, where
    resp_len[b] is the position of the row's last mask entry (at least 1). Returns (model_output, data,
    log_prob_values): model_output["log_probs"] is a nested tensor over prompt + response tokens whose
    values() leaf `log_prob_values` carries the gradient, as the engine's output does.
    """
    batch = old.shape[0]
    resp_lens = [max(int(mask[b].nonzero().max()) + 1 if mask[b].any() else 1, 1) for b in range(batch)]
    full_rows, prompts, responses = [], [], []
    gen = torch.Generator().manual_seed(0)
    for b in range(batch):
        p, r = prompt_lens[b], resp_lens[b]
        # output position j predicts token j + 1: the response's log-probs sit at [p - 1, p - 1 + r)
        row = torch.randn(p + r, generator=gen, dtype=new.dtype)
        row[p - 1 : p - 1 + r] = new[b, :r].detach()
        full_rows.append(row)
        prompts.append(torch.randint(0, 50, (p,), generator=gen))
        responses.append(torch.randint(0, 50, (r,), generator=gen))
    values = torch.cat(full_rows).requires_grad_(True)
    offsets = torch.tensor([0, *torch.tensor([len(r) for r in full_rows]).cumsum(0).tolist()])
    log_probs = torch.nested.nested_tensor_from_jagged(values, offsets=offsets)
    data = TensorDict(
        {
            "prompts": _nested(prompts),
            "responses": _nested(responses),
            "response_mask": _nested([mask[b, : resp_lens[b]].long() for b in range(batch)]),
            "old_log_probs": _nested([old[b, : resp_lens[b]] for b in range(batch)]),
            "advantages": _nested([adv[b, : resp_lens[b]] for b in range(batch)]),
        },
        batch_size=[batch],
    )
    n_tokens = int(mask.sum()) if global_tokens is None else global_tokens
    n_seqs = batch if global_seqs is None else global_seqs
    tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=n_tokens, global_batch_size=n_seqs)
    return {"log_probs": log_probs}, data, values, resp_lens


TINY_QWEN2_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
"""A 1-layer Qwen2 config.json, enough for verl's HFModelConfig (no weights are ever loaded from it)."""


def write_tiny_model_config(directory) -> None:
    """Write TINY_QWEN2_CONFIG as ``directory/config.json``."""
    import json
    import pathlib

    (pathlib.Path(directory) / "config.json").write_text(json.dumps(TINY_QWEN2_CONFIG))


def training_worker(model_config, engine_config, optim_config, actor_config):
    """verl's ``TrainingWorker`` for a language model built from these configs, reset (engine and optimizer
    built), as the v1 trainer's actor worker builds it; call it after the process group and platform are set."""
    from verl.workers.config import TrainingWorkerConfig
    from verl.workers.engine_workers import TrainingWorker

    worker = TrainingWorker(
        TrainingWorkerConfig(
            model_type="language_model", model_config=model_config, engine_config=engine_config,
            optimizer_config=optim_config, checkpoint_config=actor_config.checkpoint,
        )
    )  # fmt: skip
    worker.reset()
    return worker
