"""Bytes on the wire at CP = 2 in verl's real Megatron training path: verl's gather of full rows vs the shard-local
CPPO loss, measured per training micro-batch, then extrapolated to 8k-16k-token responses.

``benchmarks.megatron_cp_comm`` counts the same two paths on synthetic batches cut by verl's THD helpers. This
script measures them where they run: tests/support/megatron_update.py trains the binary-TV case of the recorded
vLLM rollout through verl's ``TrainingWorker`` (``MegatronEngineWithLMHead``, CP = 2, CPU test platform, gloo)
twice, once with ``verl_cppo.megatron_shard_local`` and once without it (``--gathered``: verl's own path), and
logs, per training micro-batch and rank, the bytes the rank sends in the collectives of the loss path (verl's
``postprocess_thd_engine`` all-gather of log-probs; the shard-local loss's scan / metric exchanges) and the
micro-batch's local token count. The K / V exchange of attention is not counted: both paths make it alike (and
on GPU it is TE's, not this platform's).

The extrapolation uses only measured constants: verl's path sends b_tok bytes per local token (4: one float32
log-prob; 8 with entropy), the shard-local path sends a constant per response (scan table and metric sums,
fitted from the micro-batches: bytes = c0 + c1 x responses) and nothing per token. Quantile rounds (calibrated
delta_b) add at most 4 x 2 x responses x 2^radix_bits bytes per round (verl_cppo.sharding.scan), not measured
here (the tiny task uses fixed delta_b, as the equivalence test does).

    python -m benchmarks.megatron_cp_comm_worker        # two CP = 2 runs on CPU, about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {
    "VERL_CPPO_CPU_TESTING": "1",
    "VERL_USE_EXTERNAL_MODULES": "verl_cppo.testing.register",
    "WANDB_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
# (name, responses per micro-batch, tokens per response incl. prompt): users' shapes, as benchmarks.megatron_cp_comm
SHAPES = [
    ("8k responses, 24k-token micro-batch", 3, 8192),
    ("16k responses, 32k-token micro-batch", 2, 16384),
    ("8k responses, 64k-token micro-batch", 8, 8192),
]


def measure(gathered: bool, cp: int, out_dir: str, timeout_s: int = 480) -> dict:
    """Run the update script on cp ranks (TP = 1) for the binary-TV case; return its communication log."""
    tag = "gathered" if gathered else "shard_local"
    comm = os.path.join(out_dir, f"{tag}.json")
    command = [sys.executable, "-m", "tests.support.megatron_update", os.path.join(out_dir, f"{tag}.pt")]
    store = os.path.join(out_dir, f"store_{tag}")
    if os.path.exists(store):  # a FileStore left by an earlier run would point the ranks at dead addresses
        os.remove(store)
    command += [store, "cppo", "1", str(cp), "--comm-out", comm]
    command += ["--gathered"] if gathered else []
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_USE_EXTERNAL", "VERL_CPPO", "VERL_PLAT"))}
    procs = []
    for rank in range(cp):
        env = {**base, **ENV, "PYTHONPATH": REPO_ROOT, "RANK": str(rank), "WORLD_SIZE": str(cp)}
        env.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(cp), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
        log = open(os.path.join(out_dir, f"{tag}_rank{rank}.log"), "w")
        procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=timeout_s) for p in procs]
    if codes != [0] * cp:
        raise RuntimeError(f"{tag} run failed with exit codes {codes}; logs in {out_dir}")
    with open(comm) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--keep", default=None, help="directory for the runs' logs (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="megatron_comm_") as tmp:
        out_dir = args.keep or tmp
        os.makedirs(out_dir, exist_ok=True)
        runs = {name: measure(name == "gathered", args.cp, out_dir) for name in ("gathered", "shard_local")}

    responses_per_micro = 4  # MICRO_BATCH of tests/support/multirank_update.py
    print(
        f"measured: verl's Megatron engine, CP = {args.cp}, binary TV, {responses_per_micro} responses per micro-batch"
    )
    print(f"{'path':12s} {'rank':>4s} {'micro-batches':>13s} {'local tokens':>12s} {'sent B':>8s} {'B / token':>10s}")
    per_token, per_micro_shard = [], []
    for name, run in runs.items():
        for rank, log in enumerate(run["ranks"]):
            tokens = sum(m["local_tokens"] for m in log)
            sent = sum(m[name] for m in log)
            other = sum(m["gathered" if name == "shard_local" else "shard_local"] for m in log)
            assert other == 0, f"{name} run also sent {other} B on the other path"
            print(f"{name:12s} {rank:4d} {len(log):13d} {tokens:12d} {sent:8d} {sent / tokens:10.2f}")
            if name == "gathered":
                per_token.append(sent / tokens)
            else:
                per_micro_shard.extend(m["shard_local"] for m in log)
    b_tok = max(per_token)
    b_micro = max(per_micro_shard)
    b_resp = b_micro / responses_per_micro  # upper bound per response: the constant part counted per response
    print(
        f"\nverl gathers {b_tok:.2f} B per local token (sent per rank); the shard-local loss sends at most {b_micro} B"
    )
    print(f"per micro-batch of {responses_per_micro} responses ({b_resp:.0f} B per response, independent of length)\n")
    print(f"{f'extrapolated, sent per rank, CP = {args.cp}':44s} {'gathered':>12s} {'shard-local':>12s} {'ratio':>7s}")
    for name, responses, length in SHAPES:
        gathered = b_tok * responses * length / args.cp
        shard = b_resp * responses
        print(f"{name:44s} {gathered:10,.0f} B {shard:10,.0f} B {gathered / shard:6.0f}x")


if __name__ == "__main__":
    main()
