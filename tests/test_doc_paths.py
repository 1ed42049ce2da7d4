"""Every ``verl_cppo.*`` module path and every repository file path the documentation names exists.

Dotted paths resolve without running the module's body where possible (``importlib.util.find_spec``; a
trailing attribute is looked up on the imported module), so modules that refuse to load outside their setting
(``verl_cppo.testing.register``) still count. File paths (``verl_cppo/...``, ``tests/...``, ``ci/...``,
``examples/...``, ``benchmarks/...``, ``patches/...``, a pytest ``::test`` suffix ignored) are looked up from the
repository root and from the document's own folder; globs and placeholders (``*``, ``<...>``, ``{a,b}``) are
skipped, and so is ``.ci/`` (written by the CI runner, not committed).
"""

import ast
import glob
import importlib
import importlib.util
import os
import re

import pytest

from tests.support import REPO_ROOT

DOCS = [
    "README.md",
    *sorted(
        os.path.relpath(path, REPO_ROOT)
        for top in ("verl_cppo", "examples", "patches", "ci", "benchmarks")
        for path in glob.glob(os.path.join(REPO_ROOT, top, "**", "README.md"), recursive=True)
    ),
]
DOTTED = re.compile(r"(?<![\w/.])verl_cppo(?:\.[A-Za-z_]\w*)+")
FILE = re.compile(r"(?<![\w/.-])((?:verl_cppo|tests|ci|examples|benchmarks|patches)/[\w./{},*<>-]*[\w}>*])")


def module_path_exists(dotted: str) -> bool:
    """``dotted`` is a module, or a module followed by attributes that exist."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        if i == len(parts):
            return True
        obj = importlib.import_module(name)
        for attribute in parts[i:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def file_path_exists(path: str, doc: str) -> bool:
    path = path.split("::")[0].rstrip(".")
    if any(c in path for c in "*<>{}"):
        return True  # a pattern or a placeholder
    return any(os.path.exists(os.path.join(REPO_ROOT, base, path)) for base in ("", os.path.dirname(doc)))


def stale(doc: str) -> list[str]:
    text = open(os.path.join(REPO_ROOT, doc), encoding="utf-8").read()
    bad = [m for m in sorted(set(DOTTED.findall(text))) if not module_path_exists(m)]
    return bad + [p for p in sorted(set(FILE.findall(text))) if not file_path_exists(p, doc)]


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_a_document_names_exists(doc):
    assert stale(doc) == []


CODE = sorted(
    os.path.relpath(os.path.join(folder, name), REPO_ROOT)
    for top in ("verl_cppo", "benchmarks", "examples", "ci")
    for folder, _, names in os.walk(os.path.join(REPO_ROOT, top))
    for name in names
    if name.endswith((".py", ".sh"))
)
DIFF_PATH = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[a-z0-9]+_[\w-]*\.diff)\b")  # diff files: snake_case names


@pytest.mark.parametrize("path", CODE)
def test_every_module_path_and_diff_the_code_names_exists(path):
    """Docstrings and comments: ``verl_cppo.*`` dotted paths, and ``*.diff`` files (a bare name is looked up
    in patches/ and verl_cppo/hooks/import_time_diffs/)."""
    text = open(os.path.join(REPO_ROOT, path), encoding="utf-8").read()
    bad = [m for m in sorted(set(DOTTED.findall(text))) if not module_path_exists(m)]
    for diff in sorted(set(DIFF_PATH.findall(text))):
        packaged = "verl_cppo/hooks/import_time_diffs"
        bases = ("", "patches", packaged, os.path.dirname(path)) if "/" not in diff else ("",)
        if "*" not in diff and not any(os.path.exists(os.path.join(REPO_ROOT, b, diff)) for b in bases):
            bad.append(diff)
    assert bad == []


def test_the_check_finds_the_stale_paths_it_is_for():
    assert not module_path_exists("verl_cppo.core.topk_divergence.engine_hook")
    assert not module_path_exists("verl_cppo.core.divergence.topk_divergence")
    assert not module_path_exists("verl_cppo.sharding.scan.scan")
    assert module_path_exists("verl_cppo.testing.register") and module_path_exists("verl_cppo.CPPOConfig")
    assert module_path_exists("verl_cppo.core.divergence.binary_tv")
    assert not file_path_exists("patches/topk_trainer.diff", "README.md")
    assert file_path_exists("verl_cppo/hooks/import_time_diffs/topk_agent_loop.diff", "patches/README.md")
    assert file_path_exists("data/prepare_data.py", "examples/README.md")


INSTALL = re.compile(r"^pip install (.+?)(?:\s+#.*)?$", re.MULTILINE)


def install_lines(doc: str) -> list[str]:
    return INSTALL.findall(open(os.path.join(REPO_ROOT, doc), encoding="utf-8").read())


@pytest.mark.parametrize("doc", ["README.md", "examples/README.md"])
def test_install_lines_are_verls_own_pins(doc):
    """One install line for users: verl 0.9.1 with its vllm and math extras (verl's torch / vLLM / math-verify
    pins, read from verl's metadata below) and the plugin; no torch, vLLM or math-verify pinned beside it."""
    from importlib.metadata import requires

    lines = install_lines(doc)
    assert lines
    for line in lines:
        words = line.split()
        extras = re.fullmatch(r'"?verl\[([\w,-]+)\]==0\.9\.1"?', words[0])
        assert extras and {"vllm", "math"} <= set(extras.group(1).split(",")), line
        assert words[1:] == ["./verl-cppo"] or words[1:] == ["/workspace/verl-cppo"], line
    pins = set(requires("verl"))
    assert {'torch==2.11.0; extra == "vllm"', 'vllm==0.24.0; extra == "vllm"', 'math-verify; extra == "math"'} <= pins


def _hook_names(source: str) -> set[str]:
    """The ``name=`` of every ``hooks.wrap`` call of a module: a string, or a module-level string constant."""
    tree = ast.parse(source)
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "wrap":
            for keyword in node.keywords:
                if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                    names.add(keyword.value.value)
                elif keyword.arg == "name" and isinstance(keyword.value, ast.Name):
                    names.add(constants[keyword.value.id])
    return names


HOOKS = sorted(
    name
    for path in CODE
    if path.startswith("verl_cppo/") and path.endswith(".py")
    for name in _hook_names(open(os.path.join(REPO_ROOT, path), encoding="utf-8").read())
)
SECTION_NUMBER = re.compile(r"patches/README\.md`?,?\s+sections?\s+\d")


def test_every_hook_is_listed_in_patches_readme_by_its_name():
    """patches/README.md names each hook by the ``name`` it is wrapped under (the name the code cites)."""
    text = open(os.path.join(REPO_ROOT, "patches", "README.md"), encoding="utf-8").read()
    assert len(HOOKS) >= 10
    assert [name for name in HOOKS if f"`{name}`" not in text] == []
    assert re.findall(r"^## \d|[Ss]ections? \d", text, re.MULTILINE) == []  # nothing left to cite by number


@pytest.mark.parametrize("path", [*DOCS, *CODE])
def test_hooks_are_cited_by_name_not_by_section_number(path):
    """Section numbers of patches/README.md were renumbered twice: a hook is cited by its name instead."""
    text = open(os.path.join(REPO_ROOT, path), encoding="utf-8").read()
    assert SECTION_NUMBER.findall(text) == []


def test_the_section_number_rule_finds_what_it_is_for():
    assert SECTION_NUMBER.search("the hook (patches/README.md, section 9) that")
    assert SECTION_NUMBER.search("see `patches/README.md` sections 5, 6")
    assert not SECTION_NUMBER.search("hook `cppo_val_history` in patches/README.md; DPPO paper section 5.2")
