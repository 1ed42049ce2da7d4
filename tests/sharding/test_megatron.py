"""The shard-local CP hook (verl_cppo.sharding.megatron) on verl 0.9.1's real Megatron engine code, on CPU.

gloo ranks with megatron-core's parallel_state (CP = world size). What runs for real: verl's
``MegatronEngine.forward_backward_batch`` (micro-batches, global token counts), ``forward_step``,
``gptmodel_forward_model_engine`` (THD packing, zigzag CP split, label roll, ``postprocess_thd_engine``), the
LM-head logits processor (megatron's vocab-parallel log-probs and entropy), ``postprocess_micro_batch_func``,
``postprocess_batch_func`` and megatron-core's ``forward_step_calc_loss`` (x cp_size / num_microbatches, or the
per-token 3-tuple path). What stands in: a per-token toy model (real attention across CP ranks needs CUDA
kernels), ``get_device_id`` -> "cpu", and the pipeline schedule's loop (megatron-core allocates a CUDA tensor
in it), which here is forward -> ``forward_step_calc_loss`` -> backward per micro-batch.
"""

from __future__ import annotations

import functools
import types

# Module-level imports, once: the forked ranks inherit them (each costs seconds of CPU). With megatron-core
# (in the test extra) verl's Megatron engine and THD helpers import on CPU.
import megatron.core.parallel_state as parallel_state
import pytest
import torch
import verl.workers.engine.megatron.transformer_impl as impl
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
from megatron.core.transformer import TransformerConfig
from tensordict import TensorDict
from verl.models.mcore.util import preprocess_thd_engine
from verl.utils import tensordict_utils as tu
from verl.workers.config import McoreEngineConfig
from verl.workers.utils.losses import ppo_loss

from tests.support.distributed import run_ranks
from tests.support.float32_bounds import UNIT_ROUNDOFF
from tests.support.verl_inputs import actor_config
from verl_cppo.sharding import megatron as megatron_cp
from verl_cppo.sharding.layout import zigzag_thd_layout

VOCAB, HIDDEN = 32, 8
EXTRA = ("actor/entropy_loss", "kl_loss")  # the non-negative terms verl adds to the loss (with their coefficients)

VARIANTS = {
    "token-mean": {"mode": "token-mean", "cppo": {}},
    "entropy+kl+is": {
        "mode": "seq-mean-token-mean",
        "cppo": {"delta_b_quantile": None},
        "entropy_coeff": 0.01,
        "use_kl_loss": True,
        "is_weights": True,
    },
    "per-token-loss": {"mode": "seq-mean-token-sum-norm", "cppo": {"gate": "soft"}, "per_token_loss": True},
}


def _setup(world):
    def cpu_schedule(forward_step_func, data_iterator, model, num_microbatches, forward_only=False, **_):
        store = []
        for _ in range(num_microbatches):
            out, loss_func = forward_step_func(data_iterator, model[0])
            out, _ = forward_step_calc_loss(
                model[0], out, loss_func, model[0].config, None, False, num_microbatches, store
            )
            if not forward_only:
                out.backward()
        return store

    impl.get_device_id = lambda: "cpu"
    impl.get_forward_backward_func = lambda: cpu_schedule
    parallel_state.initialize_model_parallel(context_parallel_size=world)


class Toy(torch.nn.Module):
    """Per-token LM (embedding, tanh, head): its outputs on a CP shard equal the unsharded ones."""

    model_type = ModelType.encoder_or_decoder
    pre_process = post_process = True

    def __init__(self, world, per_token_loss):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)
        self.config = TransformerConfig(
            num_layers=1,
            hidden_size=HIDDEN,
            num_attention_heads=1,
            context_parallel_size=world,
            calculate_per_token_loss=per_token_loss,
        )

    def set_input_tensor(self, x):
        pass

    def forward(self, input_ids, attention_mask=None, position_ids=None, packed_seq_params=None, **kwargs):
        return self.head(torch.tanh(self.emb(input_ids)))


def _engine(world, model, per_token_loss):
    engine = object.__new__(impl.MegatronEngineWithLMHead)  # verl's own CPU tests build engines this way
    engine.engine_config = McoreEngineConfig(context_parallel_size=world, use_mbridge=False)
    ns = types.SimpleNamespace
    engine.model_config = ns(
        hf_config=ns(architectures=["Qwen2ForCausalLM"]),
        tokenizer=ns(pad_token_id=0),
        mtp=ns(enable=False, enable_train=False),
    )
    engine.tf_config = model.config if per_token_loss else None
    engine.module = [model]
    engine.enable_routing_replay = False
    engine.mini_layer_topk_idx_list = []
    return engine


def _batch(model, variant, seed=7, batch=6):
    gen = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(1, VOCAB, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen) for _ in range(batch)
    ]
    responses = [
        torch.randint(1, VOCAB, (int(torch.randint(1, 13, (1,), generator=gen)),), generator=gen) for _ in range(batch)
    ]
    masks = [(torch.rand(len(r), generator=gen) > 0.15).long() for r in responses]
    masks[0] = torch.zeros_like(masks[0])  # a response without a valid token
    with torch.no_grad():  # mu close to the model's own log-probs, so that some tokens are kept, some masked
        old = []
        for p, r in zip(prompts, responses):
            logp = torch.log_softmax(model(torch.cat([p, r])), -1)[len(p) - 1 : -1].gather(-1, r[:, None])[:, 0]
            old.append(logp + 0.4 * torch.randn(len(r), generator=gen))

    def nested(xs):
        return torch.nested.as_nested_tensor(xs, layout=torch.jagged)

    fields = {
        "input_ids": nested([torch.cat([p, r]) for p, r in zip(prompts, responses)]),
        "prompts": nested(prompts),
        "responses": nested(responses),
        "response_mask": nested(masks),
        "loss_mask": nested([torch.cat([torch.zeros(len(p), dtype=torch.long), m]) for p, m in zip(prompts, masks)]),
        "old_log_probs": nested(old),
        "advantages": nested([torch.randn(1, generator=gen).expand(len(r)).clone() for r in responses]),
        "temperature": torch.ones(batch),
    }
    if variant.get("use_kl_loss"):
        fields["ref_log_prob"] = nested([x - 0.1 * torch.rand(len(x), generator=gen) for x in old])
    if variant.get("is_weights"):
        fields["rollout_is_weights"] = nested([2 * torch.rand(len(r), generator=gen) for r in responses])
    data = TensorDict(fields, batch_size=[batch])
    tu.assign_non_tensor(
        data,
        global_batch_size=batch,
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=2,
        use_remove_padding=True,
        use_fused_kernels=False,
        calculate_entropy=bool(variant.get("entropy_coeff")),
    )
    return data


def _all_gather_sizes():
    """Record the element count of every torch.distributed.all_gather (what each rank contributes)."""
    import torch.distributed as dist

    sizes, original = [], dist.all_gather

    def counting(tensor_list, tensor, *args, **kwargs):
        sizes.append((tensor.numel(), tensor.element_size(), tuple(tensor.shape)))
        return original(tensor_list, tensor, *args, **kwargs)

    dist.all_gather = counting
    return sizes, lambda: setattr(dist, "all_gather", original)


def _numbers(value) -> list[float]:
    """A metric as verl aggregates it over micro-batches (Metric objects, lists, numbers) as floats."""
    if isinstance(getattr(value, "values", None), list):
        return [float(x) for x in value.values]
    if isinstance(value, list | tuple):
        return [y for x in value for y in _numbers(x)]
    return [float(value)]


def _absolute_sums():
    """Record, per gathered loss call, the scales its float32 sums are bounded by: sum |L_t| w_t (verl's agg_loss
    of |pg_losses| with the loss's own normalisers) and mean |log pi - log mu| over valid tokens (ppo_kl's)."""
    import verl_cppo.loss as loss_module

    sums = {"pg": [], "log_ratio": []}
    aggregate, stats = loss_module.GatheredRows.aggregate, loss_module.torch_stats

    def recording_aggregate(self, pg_losses, response_mask, mode, batch_info):
        sums["pg"].append(float(aggregate(self, pg_losses.detach().abs(), response_mask, mode, batch_info)))
        return aggregate(self, pg_losses, response_mask, mode, batch_info)

    def recording_stats(terms, *args, **kwargs):
        n_valid = max(int(terms.valid.sum()), 1)
        sums["log_ratio"].append(float(terms.log_ratio.double().abs().mul(terms.valid).sum()) / n_valid)
        return stats(terms, *args, **kwargs)

    loss_module.GatheredRows.aggregate, loss_module.torch_stats = recording_aggregate, recording_stats

    def restore():
        loss_module.GatheredRows.aggregate, loss_module.torch_stats = aggregate, stats

    return sums, restore


def _step(world, variant, shard_local):
    megatron_cp.install() if shard_local else megatron_cp.uninstall()
    per_token = bool(variant.get("per_token_loss"))
    model = Toy(world, per_token)
    engine = _engine(world, model, per_token)
    data = _batch(model, variant)
    cfg = actor_config(
        variant["mode"],
        cppo=variant["cppo"],
        engine="megatron",
        entropy_coeff=variant.get("entropy_coeff", 0.0),
        use_kl_loss=variant.get("use_kl_loss", False),
        loss_scale_factor=16 if variant["mode"] == "seq-mean-token-sum-norm" else None,
    )
    loss_fn = functools.partial(ppo_loss, config=cfg)
    sizes, restore = _all_gather_sizes()
    try:
        out = engine.forward_backward_batch(data, loss_fn, forward_only=False)
    finally:
        restore()
    metrics = {k: _numbers(v) for k, v in out["metrics"].items()}
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return out["loss"], metrics, grads, sizes, engine, model, data, loss_fn


def _engine_body(rank, world):
    _setup(world)
    report = {}
    for name, variant in VARIANTS.items():
        sums, restore = _absolute_sums()
        try:
            loss_g, met_g, grad_g, sizes_g, *_ = _step(world, variant, shard_local=False)
        finally:
            restore()
        loss_s, met_s, grad_s, sizes_s, engine, _, data, _ = _step(world, variant, shard_local=True)
        # Tolerances (u = 2^-24, float32). The two paths differ only in the loss's arithmetic: each token's
        # coefficient is within 2 (2 T + 10) u relative (T = 12, the longest response: the soft gate's prefix
        # sums; tests/sharding/test_shard_loss.py derives it), and a micro-batch's loss sums its n <= 2 T tokens
        # in another order (<= 2 n u of the absolute sum): total = (4 T + 2 (2 T + 10)) u ~ 1e-5 of sum |L_t|,
        # recorded from the gathered path (pg), plus the entropy and KL terms (non-negative: their metrics).
        # 2x margin. Non-negative metrics: relative; pg_loss: of sum |L_t|; ppo_kl: of mean |log ratio|.
        per_token = 2 * (2 * 12 + 10) * UNIT_ROUNDOFF
        total = 2 * (4 * 12 * UNIT_ROUNDOFF + per_token)
        coefs = (variant.get("entropy_coeff", 0.0), met_g["kl_coef"][0] if "kl_coef" in met_g else 0.0)
        extra = [coefs[0] * abs(h) + coefs[1] * abs(k) for h, k in zip(*(met_g.get(m, [0.0] * 3) for m in EXTRA))]
        scale = [p + e for p, e in zip(sums["pg"], extra)]  # per micro-batch: sum |terms| of the loss
        assert len(scale) == len(loss_g) == 3, (name, sums)
        for a, b, bound in zip(loss_s, loss_g, scale):
            assert abs(a - b) <= total * bound, (name, loss_s, loss_g, scale)
        assert met_s.keys() == met_g.keys(), name
        for key in met_g:
            slack = {"actor/pg_loss": sums["pg"], "actor/ppo_kl": sums["log_ratio"]}.get(key, [0.0] * 3)
            for a, b, s in zip(met_s[key], met_g[key], slack, strict=True):
                assert abs(a - b) <= total * (abs(b) + s), (name, key, met_s[key], met_g[key])
        # each rank back-props only into its own shard in both paths: per-rank gradients agree before DDP. The
        # gradient is sum_t c_t d log pi_t / d theta over the same tokens in the same order: only the c_t differ
        # (per_token relative), so |dg| <= per_token sum_t |c_t| |J_t|. The norm |g| stands in for that sum,
        # with a factor 10 for the cancellation between responses of opposite advantage; 2x margin. A missing
        # cp_size factor or a token counted twice moves the gradient by >= 1e-2 of its norm.
        gap, size = float((grad_s - grad_g).double().norm()), float(grad_g.double().norm())
        assert gap <= 2 * 10 * per_token * size, (name, gap, size)
        # the gathered path all-gathers the [1, N_local] per-token outputs; the shard-local one never does
        token_sized = [s for s in sizes_g if len(s[2]) == 2 and s[2][0] == 1]
        n_keys = 2 if variant.get("entropy_coeff") else 1
        assert len(token_sized) == 3 * n_keys  # 3 micro-batches of 2 responses
        assert not [s for s in sizes_s if len(s[2]) == 2 and s[2][0] == 1]
        report[name] = float(grad_g.abs().sum())  # 0 on a rank that holds no response token (world 4)
        # forward-only passes (compute_log_prob) keep verl's gather and return whole sequences
        with torch.no_grad():
            inferred = engine.forward_backward_batch(data, None, forward_only=True)["model_output"]["log_probs"]
        assert [len(x) for x in inferred.unbind()] == data["input_ids"].offsets().diff().tolist()
    return report


@pytest.mark.parametrize("world", [2, 3, 4])
def test_megatron_shard_local_loss_and_gradient_equal_gathered(world):
    reports = run_ranks(_engine_body, world, time_limit_s=240)
    for name in VARIANTS:  # the test is not vacuous: the model does get a gradient
        assert sum(r[name] for r in reports) > 0, name


def _thd_body(rank, world, seed):
    _setup(world)
    gen = torch.Generator().manual_seed(seed)
    for bucket in (None, 64):
        batch = int(torch.randint(1, 7, (1,), generator=gen))
        prompt = torch.randint(1, 6, (batch,), generator=gen)
        resp = torch.randint(0, 15, (batch,), generator=gen)
        seqs = [(b + 1) * 1000 + torch.arange(int(p + r)) for b, (p, r) in enumerate(zip(prompt, resp))]
        nested = torch.nested.as_nested_tensor(seqs, layout=torch.jagged)
        local, params, _ = preprocess_thd_engine(nested, pre_process=True, pad_to_length_bucket=bucket)
        local = local[0]  # [N]: (b + 1) * 1000 + column, 0 on padding
        layout = zigzag_thd_layout(params.cu_seqlens_q_padded, prompt - 1, resp, rank, world)
        seq, col = local // 1000 - 1, local % 1000
        pos = col - (prompt - 1)[seq.clamp(min=0)] + 1
        inside = (local > 0) & (pos >= 1) & (pos <= resp[seq.clamp(min=0)])
        assert torch.equal(layout.row, torch.where(inside, seq, -1)), (rank, bucket)
        assert torch.equal(layout.position, torch.where(inside, pos, 0)), (rank, bucket)
    return True


@pytest.mark.parametrize("world", [2, 3, 4])
def test_thd_layout_is_verl_preprocess_thd_engine(world):
    """zigzag_thd_layout places every response token where verl's preprocess_thd_engine puts it."""
    assert run_ranks(_thd_body, world, 50 + world, time_limit_s=120) == [True] * world
