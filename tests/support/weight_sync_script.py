"""Run by tests/testing/test_vllm_cpu.py in a fresh process with the CPU test backend switched on.

verl's ``BucketedWeightSender`` (what verl's vLLM rollout sends trained weights with) against a receiver that
takes the first message and never answers, as after a failed load in vLLM's worker. Prints one JSON line:
the error's type and message and the seconds until it was raised.   python tests/support/weight_sync_script.py
"""

import asyncio
import json
import os
import time

import torch
import verl  # noqa: F401  (loads VERL_USE_EXTERNAL_MODULES: the CPU platform and the vLLM CPU shims)
import zmq
from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

handle = f"ipc:///tmp/verl-cppo-weight-sync-{os.getpid()}.sock"
sender = BucketedWeightSender(zmq_handle=handle, bucket_size_mb=1, use_shm=True)
receiver = zmq.Context.instance().socket(zmq.REP)
receiver.setsockopt(zmq.LINGER, 0)
receiver.connect(handle)
start = time.monotonic()
try:
    asyncio.run(sender.async_send_weights(iter([("w", torch.ones(4))])))
    result = {"error": None}
except Exception as error:  # the test asserts the type and message
    result = {"error": type(error).__name__, "message": str(error)}
result["seconds"] = round(time.monotonic() - start, 2)
receiver.close()
print(json.dumps(result))
