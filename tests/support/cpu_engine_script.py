"""Run by tests/e2e/test_cpu_engine.py in a fresh process with the CPU test backend switched on.

The switch registered the platform in verl's registry and installed the vLLM CPU shims (the script reports
both); verl's ``TrainingWorker`` (the worker behind ``compute_log_prob`` / ``update_actor``) builds the FSDP2
engine on the CPU platform around the tiny model; the script then
  1. computes log-probs with ``infer_batch`` and compares them with a plain HF forward;
  2. trains 3 mini-batches with ``loss_mode=cppo`` through verl's ``ppo_loss`` (``train_mini_batch``);
  3. exports the trained weights with the engine's ``get_per_tensor_param`` (what verl's weight sync sends the
     rollout), loads them into a fresh HF model and checks its log-probs against the engine's.
That the vLLM rollout then serves exactly these weights is checked through main_ppo, by value, at every step
(tests/testing/test_vllm_cpu.py: the rollout's log-probs equal the actor's to 1e-4).
It prints one JSON line with the measurements.   python tests/support/cpu_engine_script.py MODEL_DIR
"""

import json
import os
import socket
import sys
from functools import partial

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
os.environ["MASTER_PORT"] = str(free_port())

import verl  # noqa: E402, F401  (imports verl_cppo.testing.register: VERL_USE_EXTERNAL_MODULES)
from verl import DataProto  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.device import get_device_name  # noqa: E402
from verl.workers.config import (  # noqa: E402
    FSDPActorConfig,
    FSDPEngineConfig,
    FSDPOptimizerConfig,
    HFModelConfig,
)
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

from tests.support.float32_bounds import float32_forward_bound  # noqa: E402
from tests.support.verl_inputs import training_worker  # noqa: E402
from verl_cppo.config import CPPOConfig, CPPOPolicyLossConfig  # noqa: E402
from verl_cppo.testing import tiny_task as T  # noqa: E402

MODEL_DIR = sys.argv[1]
B, P, R = 8, 9, 6  # responses, prompt length, response length


def batch(prompt_ids: torch.Tensor, responses: torch.Tensor, old: torch.Tensor, adv: torch.Tensor):
    """A left/right padded verl batch (no padding needed here) in the engine's no-padding TensorDict form."""
    input_ids = torch.cat([prompt_ids, responses], dim=1)  # [B, P + R]
    data = DataProto.from_dict(
        {
            "prompts": prompt_ids,
            "responses": responses,
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "position_ids": torch.arange(P + R).expand(B, -1).clone(),
            "response_mask": torch.ones_like(responses),
            "old_log_probs": old,
            "advantages": adv,
        }
    ).to_tensordict()
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(data, temperature=1.0, calculate_entropy=False, global_token_num=[P + R] * B)
    return data


def main() -> None:
    from verl.plugin.platform import PlatformRegistry
    from verl.workers.rollout.llm_server import LLMServerClient

    from verl_cppo import hooks

    out = {"device": get_device_name(), "platforms": list(PlatformRegistry.registered_names())}
    out["generate_hook"] = hooks.hook_name(LLMServerClient.generate)
    model_config = HFModelConfig(
        path=MODEL_DIR, use_remove_padding=False, enable_gradient_checkpointing=False,
        override_config={"attn_implementation": "sdpa"},
    )  # fmt: skip
    engine_config = FSDPEngineConfig(
        strategy="fsdp2", model_dtype="fp32", use_torch_compile=False,
        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        micro_batch_size_per_gpu=4, infer_micro_batch_size_per_gpu=8, max_token_len_per_gpu=1024,
        infer_max_token_len_per_gpu=1024,
    )  # fmt: skip
    optim_config = FSDPOptimizerConfig(lr=3e-3, total_training_steps=10, weight_decay=0.0)
    actor_config = FSDPActorConfig(
        strategy="fsdp2", rollout_n=1, ppo_mini_batch_size=B, ppo_micro_batch_size_per_gpu=4,
        use_torch_compile=False, fsdp_config=engine_config, optim=optim_config,
        loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=R,
        policy_loss=CPPOPolicyLossConfig(loss_mode="cppo", cppo=CPPOConfig()),
    )  # fmt: skip
    worker = training_worker(model_config, engine_config, optim_config, actor_config)
    worker.set_loss_fn(partial(ppo_loss, config=actor_config))
    out["engine"] = type(worker.engine).__name__

    gen = torch.Generator().manual_seed(0)
    tok = T.build_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "b"}], add_generation_prompt=True, tokenize=True)
    prompt_ids = torch.tensor(prompt["input_ids"] if hasattr(prompt, "keys") else prompt).expand(B, -1).clone()
    responses = torch.randint(5, len(T.VOCAB), (B, R), generator=gen)  # [B, R]

    # 1. log-probs: engine vs plain HF forward
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(MODEL_DIR, attn_implementation="sdpa").eval()

    def hf_log_probs(model) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.cat([prompt_ids, responses], 1)).logits[:, P - 1 : -1].float()  # [B, R, V]
        return torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1)  # [B, R]

    def engine_log_probs() -> torch.Tensor:
        data = batch(prompt_ids, responses, torch.zeros(B, R), torch.zeros(B, R))
        tu.assign_non_tensor(data, compute_loss=False)
        result = worker.infer_batch(data)
        return no_padding_2_padding(result["log_probs"], data)  # [B, R]

    before = engine_log_probs()
    out["infer_vs_hf_max_abs"] = float((before - hf_log_probs(reference)).abs().max())
    # both are float32 forwards of the same weights through different code (verl's engine: its own attention
    # mask and position ids, FSDP2's parameters, verl's log-prob function): twice one forward's rounding
    # error, tests.support.float32_bounds.float32_forward_bound at the logits' scale (the test compares)
    with torch.no_grad():
        scale = float(reference(torch.cat([prompt_ids, responses], 1)).logits.abs().max())
    out["forward_bound"] = 2 * float32_forward_bound(reference.config, P + R, scale)

    # 2. three CPPO mini-batches through ppo_loss, anchored on the log-probs above (mu)
    adv = torch.tensor([1.0, -1.0] * (B // 2))[:, None].expand(B, R).contiguous()  # [B, R]
    losses, masked = [], []
    for _ in range(3):
        data = batch(prompt_ids, responses, before, adv)
        tu.assign_non_tensor(data, mini_batch_size=B, epochs=1, seed=0, global_batch_size=B)
        metrics = tu.get(worker.train_mini_batch(data), "metrics")
        losses.append(float(torch.tensor(metrics["loss"]).mean()))
        masked.append(float(torch.tensor(metrics["actor/cppo_masked_frac"]).mean()))
    after = engine_log_probs()
    out.update(losses=losses, masked=masked, cppo_metrics=sorted(k for k in metrics if k.startswith("actor/cppo_")))
    out["moved_toward_advantage"] = float(((after - before) * adv).sum())

    # 3. weight export -> a fresh HF model loaded with the exported tensors computes the engine's log-probs
    params, _ = worker.engine.get_per_tensor_param()
    named = [(name, t.detach().to("cpu", copy=True)) for name, t in params]
    out["exported"] = sorted(name for name, _ in named)
    fresh = AutoModelForCausalLM.from_pretrained(MODEL_DIR, attn_implementation="sdpa").eval()
    missing, unexpected = fresh.load_state_dict(dict(named), strict=False)
    out["loaded"] = len(named) - len(unexpected)
    out["not_loaded"] = sorted(set(missing) - {"lm_head.weight"} if fresh.config.tie_word_embeddings else missing)
    out["export_vs_engine_max_abs"] = float((hf_log_probs(fresh) - after).abs().max())
    out["export_moved"] = float((hf_log_probs(fresh) - hf_log_probs(reference)).abs().max())
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
