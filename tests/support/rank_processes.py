"""Start WORLD fresh interpreters of one update script as gloo ranks, and collect rank 0's output file.

The multi-rank equivalence tests (FSDP: tests/e2e/test_multirank_equivalence.py; Megatron:
tests/e2e/test_megatron_equivalence.py) run verl's ``TrainingWorker`` in new processes (not forks: verl and the
CPU platform are imported fresh, with the test platform's switch in the environment). Each rank gets RANK /
WORLD_SIZE, a FileStore path on the command line (no TCP port to collide with) and its own log file; ``finish``
waits until a deadline, kills what is left and fails with every rank's log tail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from tests.support import REPO_ROOT

SWITCH = {"VERL_CPPO_CPU_TESTING": "1", "VERL_USE_EXTERNAL_MODULES": "verl_cppo.testing.register"}
QUIET = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def start(module: str, args: list[str], world: int, out_dir: str, tag: str) -> dict:
    """``python -m module OUT STORE *args`` on ``world`` ranks; OUT and STORE are named by ``tag`` in ``out_dir``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_USE_EXTERNAL", "VERL_CPPO", "VERL_PLAT"))}
    out, store = os.path.join(out_dir, f"{tag}.pt"), os.path.join(out_dir, f"store_{tag}")
    if os.path.exists(store):  # a FileStore of an earlier run in a kept directory points at dead addresses
        os.remove(store)
    command = [sys.executable, "-m", module, out, store, *args]
    procs, logs = [], []
    for rank in range(world):
        env = {**base, **SWITCH, **QUIET, "PYTHONPATH": REPO_ROOT, "RANK": str(rank), "WORLD_SIZE": str(world)}
        env.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
        log = open(os.path.join(out_dir, f"{tag}_rank{rank}.log"), "w+")
        procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    return {"tag": tag, "procs": procs, "logs": logs, "out": out}


def finish(run: dict, deadline: float) -> dict:
    """Wait for a started run until ``deadline`` (time.monotonic), kill what is left, load rank 0's file."""
    procs, tag = run["procs"], run["tag"]
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = []
    for rank, log in enumerate(run["logs"]):
        log.seek(0)
        tails.append(f"--- rank {rank} ---\n" + log.read()[-3000:])
        log.close()
    assert codes is not None, f"{tag} ran past its deadline\n" + "\n".join(tails)
    assert codes == [0] * len(procs), f"{tag} exit codes {codes}\n" + "\n".join(tails)
    return torch.load(run["out"], weights_only=False)
