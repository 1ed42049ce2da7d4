"""verl_cppo.math_task.sandbox: a call is bounded in time and memory from any thread, a killed child is replaced, and
the pool never runs more children than it may. Each failure mode is provoked for real in a child process."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import sandbox_targets as t
from verl_cppo.math_task.sandbox import Outcome, Sandbox


@pytest.fixture
def make():
    made = []

    def build(function, **kwargs):
        kwargs.setdefault("timeout_s", 2.0)
        kwargs.setdefault("memory_mb", 256)
        box = Sandbox(function, **kwargs)
        made.append(box)
        return box

    yield build
    for box in made:
        box.close()


def test_a_result_comes_back_and_the_child_is_reused(make):
    box = make(t.pid)
    first, second = box.call(), box.call()
    assert first.ok and first == second and box.restarts == 0
    assert make(t.echo).call(1, "a", [2.5]) == Outcome("ok", (1, "a", [2.5]))


def test_past_the_deadline_the_child_is_killed_and_replaced(make):
    box = make(t.sleep, timeout_s=1.0)
    start = time.monotonic()
    outcome = box.call(60)
    assert outcome.status == "timeout" and time.monotonic() - start < 30  # not the 60 s the function asked for
    assert box.restarts == 1
    assert box.call(0) == Outcome("ok", "woke")  # a fresh child serves the next call


def test_over_the_memory_limit_is_a_memory_outcome_and_a_fresh_child(make):
    box = make(t.allocate, memory_mb=128)
    assert box.call(16) == Outcome("ok", 16 * 2**20)  # within the limit
    outcome = box.call(1024)
    assert outcome.status == "memory" and "128 MiB" in outcome.value
    assert box.restarts == 1 and box.call(16).ok


def test_a_crash_is_reported_and_an_exception_keeps_the_child(make):
    crash = make(t.die)
    assert crash.call(3).status == "crashed" and crash.restarts == 1
    error = make(t.fail)
    assert error.call("bad") == Outcome("error", "ValueError: bad") and error.restarts == 0


def test_threads_share_at_most_max_workers_children(make):
    box = make(t.pid, max_workers=2)
    with ThreadPoolExecutor(max_workers=8) as pool:
        pids = list(pool.map(lambda _: box.call().value, range(40)))
    assert 1 <= len(set(pids)) <= 2 and box.restarts == 0


def test_a_timeout_on_one_thread_does_not_stall_another(make):
    box = make(t.sleep, max_workers=2, timeout_s=3.0)
    slow = threading.Thread(target=box.call, args=(60,))
    slow.start()
    assert box.call(0) == Outcome("ok", "woke")
    slow.join(timeout=60)
    assert not slow.is_alive()


def test_bad_bounds_and_nested_functions_are_refused():
    with pytest.raises(ValueError, match="timeout_s=0"):
        Sandbox(t.echo, timeout_s=0, memory_mb=1)

    def local():
        pass

    with pytest.raises(ValueError, match="module-level functions"):
        Sandbox(local, timeout_s=1, memory_mb=1)


def test_a_forked_copy_starts_its_own_children_and_leaves_the_parents_alone(make):
    import os

    box = make(t.pid)
    parent_child = box.call().value
    pid = os.fork()
    if pid == 0:  # the forked copy: its call must not read the parent's pipe
        try:
            value = box.call().value
            os._exit(0 if value not in (None, parent_child) else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert box.call() == Outcome("ok", parent_child) and box.restarts == 0  # the parent's child still serves it
