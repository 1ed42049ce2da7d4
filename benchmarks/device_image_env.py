"""A CPU stand-in for the lent GPU machine's Python, to rehearse benchmarks/gpu_checks.sh before a device call.

    .venv/bin/python -m benchmarks.device_image_env --rehearse      # build .device-env/ (ignored), then rehearse
    .venv/bin/python -m benchmarks.device_image_env                 # only build it (about 10 s)
    benchmarks/gpu_checks.sh --check-imports --python .device-env/bin/python

The GPU machine's python3 holds the distributions listed in benchmarks/device_image_packages.txt (torch 2.11.0,
triton 3.6.0, numpy, pytest, transformers, tokenizers, ...) and none of verl's stack (verl, Ray, Hydra,
OmegaConf, tensordict, vLLM). Installing those again here would fetch several GB (torch's CUDA wheel and its
NVIDIA libraries), so this builds a virtual environment on the project .venv's base interpreter whose
site-packages holds symbolic links to the .venv's own copies of exactly the listed distributions: the same torch
and triton binaries, a few MB of links, and every package the image lacks absent, so an import the device
cannot satisfy fails here too. The project itself is not installed there: gpu_checks.sh puts the repository
root on PYTHONPATH, as on the device.

Left different: Python 3.11 here against 3.12 there, and the versions of the smaller packages (the .venv's).
No wheels need to travel for the steps that run there (see benchmarks/README.md), so none are installed.

``--rehearse`` then runs, in that environment: ``gpu_checks.sh --check-imports`` (every step's imports and
arguments), and the steps' verl-free paths on CPU at small shapes (``REHEARSAL``): the loss checks against the
float64 loop reference, the engine-hook check, the Top-K benchmark, and the Top-K kernel's edge cases in
Triton's interpreter. About 2 minutes; exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import venv
from collections import defaultdict
from pathlib import Path, PurePosixPath

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_LIST = REPO_ROOT / "benchmarks" / "device_image_packages.txt"


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (``PyYAML`` == ``pyyaml``, ``a_b`` == ``a-b``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = PACKAGE_LIST) -> set[str]:
    """The normalised names of the device image's distributions (comments and blank lines skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {normalise(line) for line in lines if line}


def installed_entries(dist: importlib.metadata.Distribution) -> set[tuple[str, ...]]:
    """The first one and two path parts of every file a distribution installed into its site-packages."""
    entries = set()
    for file in dist.files or ():
        parts = PurePosixPath(file).parts
        if not parts or parts[0] in ("..", "__pycache__"):  # scripts in bin/, caches
            continue
        entries.add(parts[:1])
        if len(parts) > 2:
            entries.add(parts[:2])
    return entries


def linked_entries(allowed: set[str]) -> tuple[list[tuple[str, ...]], list[str], list[str]]:
    """(paths to link, allowed distributions found, distributions left out) in this interpreter's environment.

    A top-level entry owned only by allowed distributions is linked whole; one shared with a left-out
    distribution (a namespace folder such as ``google/``) becomes a folder of links to its allowed parts."""
    owners: dict[tuple[str, ...], set[str]] = defaultdict(set)
    found, left_out = set(), set()
    for dist in importlib.metadata.distributions():
        name = normalise(dist.metadata["Name"])
        (found if name in allowed else left_out).add(name)
        for entry in installed_entries(dist):
            owners[entry].add(name)
    links = []
    for entry, names in sorted(owners.items()):
        ok = names <= allowed
        if len(entry) == 1 and ok:
            links.append(entry)
        elif len(entry) == 2 and ok and not owners[entry[:1]] <= allowed:
            links.append(entry)
    return links, sorted(found), sorted(left_out)


def build(target: Path) -> Path:
    """Make the environment at ``target`` (replacing it) and return its python."""
    source = Path(next(p for p in sys.path if p.endswith("site-packages")))
    links, found, left_out = linked_entries(image_packages())
    if target.exists():
        shutil.rmtree(target)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(target)
    python = target / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    for entry in links:
        origin = source.joinpath(*entry)
        if not origin.exists():  # listed in RECORD, since removed
            continue
        link = site.joinpath(*entry)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(origin, link)
    missing = sorted(image_packages() - set(found))
    print(f"{target}: {len(found)} of the image's distributions linked from {source}")
    print(f"left out (not on the device): {', '.join(left_out)}")
    print(f"on the device but not in this .venv (not needed by any step here): {len(missing)}")
    return python


REHEARSAL = [  # (extra environment, command after the interpreter): the steps' verl-free paths, small, on CPU
    ({}, ["-m", "benchmarks.bench_loss", "--check-only"]),
    ({}, ["-m", "benchmarks.gpu_topk_check", "--device", "cpu", "--tokens", "512", "--vocab", "4096"]),
    ({}, ["-m", "benchmarks.bench_topk_divergence", "--device", "cpu", "--n", "256", "--v", "4096", "--repeats", "2"]),
    ({"TRITON_INTERPRET": "1"}, ["-m", "tests.support.topk_kernel_check", "--device", "cpu"]),
]


def rehearse(python: Path) -> bool:
    """gpu_checks.sh --check-imports and REHEARSAL in the environment; True when all passed."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    commands = [
        ({}, ["bash", str(REPO_ROOT / "benchmarks" / "gpu_checks.sh"), "--check-imports", "--python", str(python)])
    ]
    commands += [(extra, [str(python), *args]) for extra, args in REHEARSAL]
    failed = []
    for extra, command in commands:
        print(f"== {' '.join(f'{k}={v}' for k, v in extra.items())} {' '.join(command)}".replace("==  ", "== "))
        run = subprocess.run(command, cwd=REPO_ROOT, env={**env, **extra}, capture_output=True, text=True)
        print("\n".join((run.stdout + run.stderr).strip().splitlines()[-4:]))
        if run.returncode != 0:
            failed.append(command)
    print(f"rehearsal: {'passed' if not failed else f'{len(failed)} FAILED'} in {python}")
    return not failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=REPO_ROOT / ".device-env", help="where to build it")
    parser.add_argument("--rehearse", action="store_true", help="then rehearse gpu_checks.sh in it (about 2 min)")
    args = parser.parse_args()
    if sys.prefix == sys.base_prefix:
        sys.exit("device_image_env: run it with the project's .venv python (it links that environment's packages)")
    python = build(args.dir.resolve())
    probe = "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__)"
    print(subprocess.check_output([python, "-c", probe], text=True, env={**os.environ, "PYTHONPATH": ""}).strip())
    if args.rehearse and not rehearse(python):
        sys.exit(1)


if __name__ == "__main__":
    main()
