"""Forward + backward time and peak extra memory of the policy losses, as ratios measured in one run.

Cases: verl's ``vanilla`` and ``dppo_tv`` and our ``cppo`` (torch path: fixed delta_b, calibrated delta_b = the
default settings, and calibrated with every row's quantile inside the clamp so that every row runs the selection;
the non-default settings soft gate, binary_kl (calibrated and fixed delta_b), shuffle_positions, and the default
settings on inputs with 1% NaN log mu and 1% NaN log pi tokens; fused Triton kernel: the first three on CUDA),
each called through verl's policy-loss registry exactly as verl's ``ppo_loss`` calls it: one call returning
(loss, metrics) including the metrics' host copy, then ``loss.backward()``. Ratios are printed to ``dppo_tv``
and to the default cppo case. Before timing, every cppo implementation is checked against the float64 loop
reference of tests/support/reference.py.

    python -m benchmarks.bench_loss                      # CPU, 16 x 4096 fp32, 1 thread (reduced size)
    python -m benchmarks.bench_loss --device cuda        # GPU, 64 x 8192 and 16 x 32768 fp32

Time: CPU, interleaved rounds of every case, the median over rounds of each case's ratio to dppo_tv (and to
the default cppo case) in the same round (robust to a shared machine), plus the fastest round; CUDA, CUDA
events around each iteration after a warm-up, the median. Peak extra memory: CUDA, max_memory_allocated above
the inputs; CPU, the peak of live tensor bytes created during one forward + backward, from the profiler's
memory timeline. The bytes floor is the time to read log_prob, old_log_prob, advantages, response_mask and
write the gradient once, at the copy bandwidth measured in the same run.

Without verl (the lent GPU machine's image has torch, triton and numpy but not verl): verl's losses and the
registry path cannot run, so the cppo cases call the token loss directly (``cppo_token_losses`` + ``torch_stats``
or ``fused_cppo_token_losses``, the metric sums' host copy, a token-mean and ``backward``: what the registered
loss does around verl's ``agg_loss``), ratios are to the default cppo case only, and a ``SKIPPED`` line says so.
The correctness checks are the same against the float64 loop reference, on the same path.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch
from torch.profiler import profile
from torch.profiler._memory_profiler import Action

from tests.support.reference import RefParams, near_threshold_row, random_case, reference_cppo, reference_loss_and_grad
from verl_cppo.core.mask import response_lengths, shuffled_positions
from verl_cppo.core.token_loss import cppo_token_losses, torch_stats
from verl_cppo.kernels import triton_installed

HAS_VERL = importlib.util.find_spec("verl") is not None
if HAS_VERL:  # verl's own losses, and cppo through verl's registry (as verl's ppo_loss calls it)
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    import verl_cppo  # noqa: F401  (registers loss_mode=cppo)
    from tests.support.verl_inputs import actor_config


SELECT_ALL = {"delta_b": 1e-6, "delta_b_max_mult": 1e9}  # every row's quantile lies inside the clamp
DEFAULT = "cppo torch calibrated"  # the default cppo settings: the base of the non-default settings' ratios
NAN_INPUTS = "cppo torch NaN inputs"  # default settings; 1% of tokens with NaN log mu, 1% with NaN log pi
BASE = "dppo_tv" if HAS_VERL else DEFAULT  # every case's time and memory ratio is to this case's
BASE_LABEL = "dppo_tv" if HAS_VERL else "default"
CASES = {
    "vanilla": ("vanilla", None),
    "dppo_tv": ("dppo_tv", None),
    "cppo torch fixed": ("cppo", {"kernel": "torch", "delta_b_quantile": None, "delta_b": 0.015}),
    DEFAULT: ("cppo", {"kernel": "torch"}),
    "cppo torch select-all": ("cppo", {"kernel": "torch", **SELECT_ALL}),
    "cppo torch soft gate": ("cppo", {"kernel": "torch", "gate": "soft"}),
    "cppo torch binary_kl": ("cppo", {"kernel": "torch", "divergence": "binary_kl"}),
    "cppo torch kl fixed": (
        "cppo",
        {"kernel": "torch", "divergence": "binary_kl", "delta_b_quantile": None, "delta_b": 0.015},
    ),
    "cppo torch shuffle": ("cppo", {"kernel": "torch", "shuffle_positions": True}),
    NAN_INPUTS: ("cppo", {"kernel": "torch"}),
    "cppo fused fixed": ("cppo", {"kernel": "triton", "delta_b_quantile": None, "delta_b": 0.015}),
    "cppo fused calibrated": ("cppo", {"kernel": "triton"}),
    "cppo fused select-all": ("cppo", {"kernel": "triton", **SELECT_ALL}),
}


def make_batch(batch: int, width: int, device, dtype, seed: int = 0, spread: float = 0.05):
    """Right-padded responses of lengths in [width / 4, width] (one of full width), sampled-token log-probs
    mostly near 0, log pi = log mu + spread * N(0, 1), one advantage per response."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(width // 4, width + 1, (batch,), generator=gen)
    lengths[0] = width
    mask = torch.arange(width)[None, :] < lengths[:, None]
    log_mu = torch.log(torch.rand(batch, width, generator=gen).pow(0.3).clamp(min=1e-6))
    log_pi = (log_mu + spread * torch.randn(batch, width, generator=gen)).clamp(max=0.0)
    adv = torch.randn(batch, 1, generator=gen).expand(batch, width).contiguous()
    return [t.to(device=device, dtype=dtype) for t in (log_mu, log_pi, adv)] + [mask.to(device)]


def with_nan(data, frac: float = 0.01, seed: int = 1):
    """A copy of a batch with NaN log mu at a random `frac` of the tokens and NaN log pi at another `frac`."""
    old, new, adv, mask = data
    gen = torch.Generator().manual_seed(seed)
    old, new = old.clone(), new.clone()
    for t in (old, new):
        t[(torch.rand(t.shape, generator=gen) < frac).to(t.device)] = torch.nan
    return [old, new, adv, mask]


@dataclass
class TokenParams(RefParams):
    """The token loss's parameters (``TokenLossParams``) without verl's config class: the reference's fields
    (whose defaults are ``CPPOConfig``'s) plus ``shuffle_positions``."""

    shuffle_positions: bool = False


def token_level_loss(old, new, adv, mask, setting: dict):
    """The registered loss's work without verl: token losses and metric sums on the chosen kernel, the sums'
    host copy, token-mean over the response tokens (verl's agg_loss with dp_size 1). A 0-dim loss."""
    params = TokenParams(**{key: value for key, value in setting.items() if key != "kernel"})
    if setting.get("kernel") == "triton":
        from verl_cppo.kernels.fused_loss import fused_cppo_token_losses

        pg_losses, stats = fused_cppo_token_losses(old, new, adv, mask, params)
    else:
        terms = cppo_token_losses(old, new, adv, mask, params)
        pg_losses, stats = terms.pg_losses, torch_stats(terms, mask, params.ratio_cap)
    stats.tolist()  # the metrics' device-to-host copy
    maskf = mask.to(pg_losses.dtype)  # [B, T]
    return (pg_losses * maskf).sum() / maskf.sum().clamp(min=1)


def cppo_loss(old, new, adv, mask, setting: dict | None, loss_mode: str = "cppo"):
    """The loss as verl computes it where verl is installed (its registry), else ``token_level_loss``."""
    if not HAS_VERL:
        return token_level_loss(old, new, adv, mask, setting)
    cfg = actor_config("token-mean", cppo=setting, loss_mode=loss_mode)
    loss, _ = get_policy_loss_fn(loss_mode)(
        old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, loss_agg_mode="token-mean", config=cfg
    )
    return loss


def make_call(case: str, data):
    loss_mode, cppo = CASES[case]
    old, new, adv, mask = data
    leaf = new.clone().requires_grad_(True)

    def call():
        leaf.grad = None  # (outside the profiled region for the memory figure: see peak_memory)
        cppo_loss(old, leaf, adv, mask, cppo, loss_mode).backward()

    call.leaf = leaf
    return call


# ---------------------------------------------------------------------------------------------- checks
def check_against_reference(device, kernels) -> None:
    """Loss and gradient of ``cppo_loss`` vs the float64 loop reference, per kernel (small rows)."""
    gen = torch.Generator().manual_seed(3)
    settings = ({}, {"delta_b_quantile": None, "delta_b": 0.015}, {"gate": "soft"}, SELECT_ALL)
    settings += ({"divergence": "binary_kl"}, {"nan": True})
    for setting in settings:
        old, new, adv, mask = random_case(gen, batch=6, width=37, spread=0.4)
        if setting.pop("nan", False):  # (the reference drops non-finite tokens too)
            old, new, adv, mask = with_nan([old, new, adv, mask], frac=0.1)
        ref_loss, ref_grad, _ = reference_loss_and_grad(old, new, adv, mask, RefParams(**setting), "token-mean")
        for kernel in kernels:
            leaf = new.to(device, copy=True).requires_grad_(True)
            loss = cppo_loss(old.to(device), leaf, adv.to(device), mask.to(device), {**setting, "kernel": kernel})
            loss.backward()
            assert abs(loss.item() - ref_loss) <= 1e-12 * abs(ref_loss) + 1e-14, (kernel, setting, loss.item())
            torch.testing.assert_close(leaf.grad.cpu(), ref_grad, rtol=1e-12, atol=1e-14)
    check_shuffle()
    path = "through verl's registry" if HAS_VERL else "token level (verl not installed)"
    print(
        f"check: cppo {'/'.join(kernels)} {path}: loss and gradient == float64 loop reference (float64, "
        f"{len(settings)} settings incl. soft gate, binary_kl, NaN inputs; shuffle: the mask of the drawn positions)"
    )


def check_shuffle() -> None:
    """shuffle_positions: the torch path's mask == the loop reference's for the positions it drew."""
    old, new, adv, mask = random_case(torch.Generator().manual_seed(4), batch=6, width=37, spread=0.4)
    torch.manual_seed(11)
    terms = cppo_token_losses(old, new, adv, mask, TokenParams(shuffle_positions=True))
    torch.manual_seed(11)  # the same draw from the global generator
    positions = shuffled_positions(response_lengths(mask), mask.shape[-1])
    assert terms.gate.masked.tolist() == reference_cppo(old, new, adv, mask, RefParams(), positions).masked


def check_fused_on_device(device, batch: int, width: int) -> None:
    """The compiled kernel's mask vs the loop reference (float64, exact; random and near-threshold rows), and
    vs the torch path in float32 at 64 x 8192 (tokens may differ only by rounding at the threshold)."""
    from verl_cppo.kernels.fused_loss import fused_cppo_token_losses

    def fused_masked(old, new, adv, mask, setting):
        args = [t.to(device) for t in (old, new, adv, mask)]
        flags = fused_cppo_token_losses(*args, TokenParams(**setting), debug=True)[2][1]
        return (flags & 1).bool().cpu().tolist()

    old, new, adv, mask = make_batch(batch, width, "cpu", torch.float64, seed=5, spread=0.3)
    settings = ({}, {"gate": "soft", "divergence": "binary_kl", "delta": 0.05}, SELECT_ALL, {"position_horizon": 512})
    for setting in settings:
        ref = reference_cppo(old, new, adv, mask, RefParams(**setting))
        assert fused_masked(old, new, adv, mask, setting) == ref.masked, setting
    gen = torch.Generator().manual_seed(8)
    for setting, db in (({"delta_b_quantile": None}, 0.02), ({}, 0.04)):
        rows = [near_threshold_row(gen, 300, RefParams(**setting), db, 1e-9) for _ in range(8)]
        old_n, new_n = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        adv_n, mask_n = torch.ones_like(old_n), torch.ones_like(old_n, dtype=torch.bool)
        ref = reference_cppo(old_n, new_n, adv_n, mask_n, RefParams(**setting))
        assert fused_masked(old_n, new_n, adv_n, mask_n, setting) == ref.masked, setting
    old32, new32, adv32, mask32 = make_batch(64, 8192, device, torch.float32, seed=6, spread=0.3)
    flags = fused_cppo_token_losses(old32, new32, adv32, mask32, TokenParams(), debug=True)[2][1]
    torch_masked = cppo_token_losses(old32, new32, adv32, mask32, TokenParams()).gate.masked
    differ = ((flags & 1).bool() != torch_masked).sum().item()
    print(
        f"check: compiled kernel on {describe(device)}: float64 masks == loop reference ({batch}x{width}, "
        f"{len(settings)} settings; near-threshold rows at 1e-9, fixed and calibrated); float32 64x8192: "
        f"{differ} of {int(mask32.sum())} tokens masked differently from the torch path (threshold rounding)"
    )


# ---------------------------------------------------------------------------------------------- timing
def copy_bandwidth(device) -> float:
    """Bytes per second of a large read + write (clone), best of 5."""
    x = torch.empty(64 * 2**20 // 4, device=device)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        x.clone()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_cuda(calls: dict, repeats: int, warmup: int) -> dict:
    out = {}
    for name, call in calls.items():
        for _ in range(warmup):
            call()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        out[name] = {"time": statistics.median(times)}
    return out


def time_cpu(calls: dict, rounds: int, inner: int) -> dict:
    """Interleaved rounds; per case the fastest round and the medians over rounds of its ratios to dppo_tv
    and to the default cppo case in the same round.

    Two clocks: wall time, and the process CPU time (time.process_time, all threads), which a shared
    machine's other processes do not inflate (with more torch threads it also counts their spinning)."""
    for call in calls.values():
        call()
    per_round = {name: {"wall": [], "cpu": []} for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(inner):
                call()
            per_round[name]["cpu"].append((time.process_time() - c0) / inner)
            per_round[name]["wall"].append((time.perf_counter() - w0) / inner)
    out = {}
    for name, clocks in per_round.items():
        out[name] = {"time": min(clocks["wall"]), "cpu_time": min(clocks["cpu"])}
        for base, key in ((BASE, "ratio"), (DEFAULT, "default")):
            for clock, times in clocks.items():
                ratios = [t / b for t, b in zip(times, per_round[base][clock])]
                q1, median, q3 = statistics.quantiles(ratios, n=4)
                out[name][f"{clock}_{key}"] = (median, q1, q3)
    return out


def peak_memory(call, device) -> int:
    call.leaf.grad = None
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
        call()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


def run_size(device, batch, width, cases, args, bandwidth) -> None:
    data = make_batch(batch, width, device, torch.float32, spread=args.spread)
    nan_data = with_nan(data)
    calls = {name: make_call(name, nan_data if name == NAN_INPUTS else data) for name in cases}
    if torch.device(device).type == "cuda":
        results = time_cuda(calls, args.repeats, args.warmup)
    else:
        results = time_cpu(calls, args.rounds, args.inner)
    for name, call in calls.items():
        results[name]["memory"] = peak_memory(call, device)
    floor = batch * width * (4 + 4 + 4 + 1 + 4) / bandwidth  # read 3 fp32 + bool mask, write fp32 grad
    base, default = results[BASE], results[DEFAULT]
    print(f"\n{batch} x {width} fp32 on {describe(device)}; bytes floor {floor * 1e3:.4f} ms")
    cpu = "cpu_time" in base
    header = (
        f"{'case':24s} {'fwd+bwd ms':>11s} {'/ ' + BASE_LABEL:>10s} {'/ default':>10s} {'/ floor':>9s} {'peak MB':>8s}"
        f" {'/ ' + BASE_LABEL:>9s}"
    )
    if cpu:
        header = (
            f"{'case':24s} {'wall ms':>8s} {'cpu ms':>8s} {'/ floor':>8s} {'peak MB':>8s} {'/ ' + BASE_LABEL:>9s}"
            f"   per-round ratio, median [IQR] of cpu time: to {BASE} | to {DEFAULT}; wall time: to {BASE}"
        )
    print(header)
    for name, r in results.items():
        memory = f"{r['memory'] / 2**20:8.2f} {r['memory'] / max(base['memory'], 1):9.2f}"
        if cpu:
            (cm, c1, c3), (dm, d1, d3), (wm, w1, w3) = r["cpu_ratio"], r["cpu_default"], r["wall_ratio"]
            print(
                f"{name:24s} {r['time'] * 1e3:8.3f} {r['cpu_time'] * 1e3:8.3f} {r['cpu_time'] / floor:8.1f} {memory}"
                f"   {cm:.2f} [{c1:.2f}, {c3:.2f}] | {dm:.2f} [{d1:.2f}, {d3:.2f}]; {wm:.2f} [{w1:.2f}, {w3:.2f}]"
            )
        else:
            ratio, to_default = r["time"] / base["time"], r["time"] / default["time"]
            print(
                f"{name:24s} {r['time'] * 1e3:11.3f} {ratio:10.2f} {to_default:10.2f} {r['time'] / floor:9.1f} {memory}"
            )


def describe(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default=None, help="e.g. 64x8192,16x32768 (default: by device)")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads")
    parser.add_argument("--rounds", type=int, default=30, help="CPU: interleaved rounds")
    parser.add_argument("--inner", type=int, default=3, help="CPU: calls per case per round")
    parser.add_argument("--repeats", type=int, default=50, help="CUDA: timed iterations per case")
    parser.add_argument("--warmup", type=int, default=10, help="CUDA: untimed iterations per case")
    parser.add_argument("--spread", type=float, default=0.05, help="std of log pi - log mu")
    parser.add_argument(
        "--cases", default=None, help="comma-separated subset of the cases (dppo_tv and the default always run)"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    parser.add_argument("--check-only", action="store_true", help="run the correctness checks only")
    return parser


def main() -> None:
    args = parser().parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads) if device == "cpu" else None
    fused = device == "cuda" and triton_installed()
    cases = [c for c in CASES if (fused or "fused" not in c) and (HAS_VERL or CASES[c][0] == "cppo")]
    if not HAS_VERL:
        print(
            "SKIPPED verl's vanilla and dppo_tv, and cppo through verl's registry: verl is not installed; the cppo "
            "cases run at the token level and their ratios are to the default cppo case"
        )
    if args.cases:
        chosen = {BASE, DEFAULT, *(c.strip() for c in args.cases.split(","))}
        unknown = chosen - set(CASES)
        if unknown:
            sys.exit(f"--cases: unknown {sorted(unknown)}; known: {list(CASES)}")
        cases = [c for c in cases if c in chosen]
    if not args.no_check:
        check_against_reference(device, ["torch", "triton"] if fused else ["torch"])
        if fused:
            check_fused_on_device(device, 8, 700)
    if args.check_only:
        return
    sizes = args.sizes or ("64x8192,16x32768" if device == "cuda" else "16x4096")
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; torch {torch.__version__}")
    for size in sizes.split(","):
        batch, width = (int(v) for v in size.lower().split("x"))
        run_size(device, batch, width, cases, args, bandwidth)


if __name__ == "__main__":
    main()
