"""Run a function on N gloo ranks (forked from the test process: nothing is re-imported), under a time limit.

Every rank calls ``init_process_group(..., timeout=...)`` through a FileStore in a fresh temporary directory
(no TCP port to collide with other test runs on the machine) and runs with one intra-op thread. A rank's
exception comes back with its traceback; a rank that hangs is killed when the time limit passes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = 60


def _plain(x):
    """Tensors as nested lists: a tensor sent through the queue would outlive the child's shared memory."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_plain(v) for v in x)
    return x


def _child(fn, rank, world, store_path, queue, args):
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, "ok", _plain(result)))
    except BaseException:  # report everything (assertion errors included) to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world: int, *args, time_limit_s: float = 120.0):
    """fn(rank, world, *args) on `world` gloo ranks; returns the results by rank, raises on any failure."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_child, args=(fn, r, world, store, queue, args)) for r in range(world)]
        for p in procs:
            p.start()
        results, errors = {}, []
        deadline = time.monotonic() + time_limit_s
        try:
            while len(results) < world and not errors:  # the first failure ends the run: the others would hang
                rank, status, payload = queue.get(timeout=max(deadline - time.monotonic(), 0.01))
                if status == "ok":
                    results[rank] = payload
                else:
                    errors.append(f"rank {rank}:\n{payload}")
        except queue_module.Empty:
            errors.append(f"timed out after {time_limit_s} s; ranks done: {sorted(results)}")
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.5)
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        raise AssertionError("distributed test failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
