"""Run by tests/testing/test_rollout_bounds.py in a fresh process with the CPU test backend switched on.

verl's ``LLMServerClient`` (what every agent loop sends its requests through) and verl's load balancer, in a
local Ray, routing to a rollout server that accepts the request and never answers, as an engine stuck inside
a step does. Prints one JSON line: the error's type and message, the seconds until it was raised, and the
load balancer's in-flight count afterwards.   python tests/support/generate_timeout_script.py
"""

import asyncio
import json
import time

import ray
import verl  # noqa: F401  (loads VERL_USE_EXTERNAL_MODULES: the CPU platform and the rollout bounds)
from omegaconf import OmegaConf
from verl.workers.rollout.llm_server import LLMServerClient
from verl.workers.rollout.router import GlobalRequestLoadBalancer


@ray.remote
class SilentServer:
    """A rollout server whose ``generate`` takes the request and never returns."""

    async def generate(self, **request):
        await asyncio.Event().wait()


async def main() -> dict:
    balancer = ray.remote(GlobalRequestLoadBalancer).remote({"replica-0": SilentServer.remote()})
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"name": "vllm", "full_determinism": False}}})
    client = LLMServerClient(config, balancer)
    start = time.monotonic()
    try:
        await client.generate("request-0", prompt_ids=[1, 2, 3], sampling_params={"max_tokens": 4})
        result = {"error": None}
    except Exception as error:  # the test asserts the type and message
        result = {"error": type(error).__name__, "message": str(error)}
    result["seconds"] = round(time.monotonic() - start, 2)
    await asyncio.sleep(0.5)  # the release is fire-and-forget
    result["inflight"] = await balancer.get_total_inflight.remote()
    return result


ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
print(json.dumps(asyncio.run(main())))
ray.shutdown()
