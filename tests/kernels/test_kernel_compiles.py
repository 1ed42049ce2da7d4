"""The fused kernel compiles for an H100/H200 (sm_90) without a GPU: Triton's compiler and the ptxas shipped
in its wheel lower it to a cubin here, which catches what the interpreter does not check (types of
loop-carried values, scalar control flow, constexpr branches). It runs in a fresh process because this
test process has Triton's interpreter on (conftest)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

ROOT = Path(REPO_ROOT)
DEFAULT = {
    "KL": False,
    "CALIBRATED": True,
    "POSITION_WEIGHT": True,
    "PREFIX_BUDGET": True,
    "SOFT": False,
    "HAS_ISW": False,
    "HAS_POS": False,
    "DEBUG": False,
}
VARIANTS = {
    "default": DEFAULT,
    "kl-soft-is-positions-debug": {**DEFAULT, **dict.fromkeys(["KL", "SOFT", "HAS_ISW", "HAS_POS", "DEBUG"], True)},
}


def compile_sm90(fp: str, flags: dict) -> dict:
    """Compile the kernel for sm_90 (needs TRITON_INTERPRET unset). Returns the cubin size and PTX entry."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from verl_cppo.kernels import cppo_triton

    fn = cppo_triton.cppo_fwd_kernel
    constexprs = {
        "N_STATS": cppo_triton.N_STATS,
        "LIBDEVICE": True,
        "KEY": tl.int64 if fp == "fp64" else tl.int32,
        "KEY_BITS": 64 if fp == "fp64" else 32,
        "BLOCK": 2048,
        **flags,
    }
    pointers = {"mask_ptr": "*u8", "pos_ptr": "*i64", "flags_ptr": "*i8"}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*" + fp)
        else:
            signature[name] = "i32"
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "enable_fp_fusion": False})
    return {"cubin_bytes": len(kernel.asm["cubin"]), "entry": ".entry cppo_fwd_kernel" in kernel.asm["ptx"]}


@pytest.mark.slow
def test_kernel_compiles_to_an_sm90_cubin():
    """Both ends of the constexpr space (the default config; binary KL, soft gate, IS weights, shuffled
    positions and the debug outputs), in one fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.test_kernel_compiles"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(VARIANTS)
    assert all(r["cubin_bytes"] > 0 and r["entry"] for r in results.values())


if __name__ == "__main__":  # python -m tests.kernels.test_kernel_compiles, from the repository root
    print(json.dumps({name: compile_sm90("fp32", flags) for name, flags in VARIANTS.items()}))
