"""The Top-K diffs as the plugin applies them: verl_cppo.hooks.diffs applies every hunk to the pinned verl and the
result compiles; a Top-K process (VERL_CPPO_TOPK set) imports the patched modules, any other process verl's
own; patching fails loudly rather than silently (a hunk that no longer applies, a module imported too early).
(tests/hooks/test_diffs_apply.py checks the same diffs with GNU ``patch --dry-run``.)"""

import os
import subprocess
import sys
import textwrap

import pytest
import verl

from tests.support import REPO_ROOT
from verl_cppo.hooks.diffs import PATCH_DIR, PatchError, apply_diff, parse_diff
from verl_cppo.topk.setup import TOPK_DIFFS

ROOT = REPO_ROOT
SITE = os.path.dirname(os.path.dirname(verl.__file__))
PATCHED = {
    "verl.workers.rollout.vllm_rollout.vllm_async_server": "add_vllm_topk",
    "verl.workers.rollout.sglang_rollout.async_sglang_server": "add_sglang_topk",
    "verl.workers.rollout.llm_server": "record_generation",
    "verl.experimental.agent_loop.agent_loop": "generation_recorder",
    "verl.trainer.ppo.v1.agent_loop_tq": "response_topk_fields",
    "verl.trainer.ppo.padding_utils": "pad_topk_fields",
    "verl.trainer.ppo.v1.trainer_base": "rollout_topk() > 0",
    "verl.trainer.ppo.ray_trainer": "rollout_topk() > 0",
    "verl.workers.engine_workers": "ppo_loss_with_topk",
}


def test_topk_diffs_cover_exactly_the_documented_modules():
    modules = {p.module for name in TOPK_DIFFS for p in parse_diff((PATCH_DIR / name).read_text(), name)}
    assert modules == set(PATCHED)
    readme = open(os.path.join(ROOT, "patches", "README.md")).read()
    assert all(name in readme for name in TOPK_DIFFS)


@pytest.mark.parametrize("name", TOPK_DIFFS)
def test_each_hunk_applies_and_the_module_compiles(name):
    for patch in parse_diff((PATCH_DIR / name).read_text(), name):
        with open(os.path.join(SITE, patch.path)) as f:
            original = f.read()
        patched = apply_diff(original, patch)
        assert patched != original and PATCHED[patch.module] in patched
        compile(patched, patch.path, "exec")


def test_apply_diff_tolerates_an_offset_and_refuses_changed_context():
    source = "".join(f"line {i}\n" for i in range(1, 30))
    diff = textwrap.dedent("""\
        --- a/pkg/mod.py
        +++ b/pkg/mod.py
        @@ -10,3 +10,4 @@
         line 10
         line 11
        +inserted
         line 12
        """)
    (patch,) = parse_diff(diff, "t.diff")
    assert patch.module == "pkg.mod"
    assert "line 11\ninserted\nline 12" in apply_diff(source, patch)
    assert "line 11\ninserted\nline 12" in apply_diff("extra\n" * 5 + source, patch)  # 5 lines lower
    with pytest.raises(PatchError, match=r"t.diff: hunk @@ -10,3 \+10,4 @@ of pkg/mod.py does not apply"):
        apply_diff(source.replace("line 11\n", "line eleven\n"), patch)


def _start(code: str, topk: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "VERL_CPPO_TOPK"}
    if topk is not None:
        env["VERL_CPPO_TOPK"] = topk
    env["PYTHONPATH"] = ROOT
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# vLLM / SGLang cannot be imported here; the six other patched modules are checked (inspect reads the code that
# runs, via linecache). One process with VERL_CPPO_TOPK, one without: each imports verl once.
_PROBE = textwrap.dedent("""\
    import importlib, inspect, os, sys, verl, torch
    for m in {modules!r}:
        if m.endswith(("vllm_async_server", "async_sglang_server")):
            continue
        print(m, "verl_cppo" in inspect.getsource(importlib.import_module(m)))
    from verl.trainer.ppo.padding_utils import construct_minimal_padding_template
    src = {{"prompts": torch.arange(4), "responses": torch.arange(6), "input_ids": torch.arange(10),
           "response_mask": torch.ones(6, dtype=torch.long),
           "rollout_topk_ids": torch.zeros(6, 3, dtype=torch.int32), "rollout_topk_log_probs": torch.zeros(6, 3)}}
    sample, _ = construct_minimal_padding_template(src, {{"status": "success"}}, eos_token_id=2)
    print("padding", tuple(sample["responses"].shape), sample["rollout_topk_ids"].tolist())
    import verl.workers.engine_workers as ew, verl.trainer.ppo.v1.trainer_base as tb
    print("cppo_grpo hooks", hasattr(ew.TrainingWorker.train_batch, "__verl_cppo_hook__"),
          hasattr(tb.PPOTrainer._compute_advantage, "__verl_cppo_hook__"))
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker as W
    print("legacy agent loop hooks", getattr(W._agent_loop_postprocess, "__verl_cppo_hook__", None),
          getattr(W._postprocess, "__verl_cppo_hook__", None))
    if "VERL_CPPO_TOPK" not in os.environ:  # a patched module imported before the finder: refused loudly
        os.environ["VERL_CPPO_TOPK"] = "4"
        from verl_cppo.topk.setup import install_topk_runtime
        install_topk_runtime()
    """)


@pytest.fixture(scope="module")
def probes():
    code = _PROBE.format(modules=list(PATCHED))
    on, off = _start(code, "3"), _start(code, None)  # concurrently: each spends its time importing verl
    return _finish(on), _finish(off)


def test_patched_only_in_topk_processes(probes):
    on, off = probes
    assert on.returncode == 0, on.stderr[-3000:]
    assert [line for line in on.stdout.splitlines() if line.startswith("verl.")] == [
        f"{m} True" for m in PATCHED if not m.endswith(("vllm_async_server", "async_sglang_server"))
    ]
    assert len([line for line in off.stdout.splitlines() if line.startswith("verl.") and line.endswith(" False")]) == 7


def test_section_2_hooks_still_wrap_the_patched_modules(probes):
    """The cppo_grpo exclusion hooks wrap functions of two modules the Top-K diffs patch (patches/README.md)."""
    on, _ = probes
    assert "cppo_grpo hooks True True" in on.stdout


def test_the_legacy_agent_loop_is_wrapped_only_in_topk_processes(probes):
    """The DataProto agent loop's two Top-K hooks (verl_cppo.topk.setup.LEGACY_TRAJECTORY_HOOK, LEGACY_BATCH_HOOK)."""
    on, off = probes
    assert "legacy agent loop hooks topk_legacy_trajectory topk_legacy_batch" in on.stdout
    assert "legacy agent loop hooks None None" in off.stdout


def test_patched_padding_template_gives_empty_rows(probes):
    """verl's construct_minimal_padding_template rebuilds our fields to the padding sample's one-token response
    (unpatched, it would copy the source sample's six rows and misalign the batch)."""
    on, off = probes
    assert "padding (1,) [[-1, -1, -1]]" in on.stdout
    assert "padding (1,) [[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]" in off.stdout


def test_module_imported_before_the_plugin_cannot_be_patched(probes):
    _, off = probes
    assert off.returncode != 0
    assert "was imported before verl-cppo could patch it; load verl-cppo first" in off.stderr
