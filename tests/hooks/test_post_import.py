"""when_imported: a callback runs once, right after the module finished executing, without importing it early."""

import sys

from verl_cppo.hooks.post_import import when_imported


def test_a_callback_runs_after_the_import_and_only_once(tmp_path, monkeypatch):
    (tmp_path / "verl_cppo_probe_module.py").write_text("VALUE = 41\nVALUE += 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "verl_cppo_probe_module", raising=False)
    seen = []
    when_imported("verl_cppo_probe_module", lambda module: seen.append(module.VALUE))
    assert seen == [] and "verl_cppo_probe_module" not in sys.modules  # not imported early
    import verl_cppo_probe_module

    assert seen == [42]  # the module's body had finished
    monkeypatch.delitem(sys.modules, "verl_cppo_probe_module")
    import verl_cppo_probe_module  # noqa: F401, F811  (a second import runs nothing pending)

    assert seen == [42]


def test_an_imported_module_gets_the_callback_at_once():
    seen = []
    when_imported("json", lambda module: seen.append(module.__name__))
    assert seen == ["json"]
