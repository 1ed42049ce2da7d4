"""Run a function under a hard deadline and a memory limit, from any thread: a small pool of child processes.

verl calls a reward function from a thread pool (``loop.run_in_executor`` in its reward managers, inside a
Ray actor), where ``signal.alarm`` timeouts cannot run, and math parsing of a hostile answer can run for
minutes or grow to gigabytes (``9^{9^{9^{9}}}``). A thread cannot be stopped; a process can. So:

* A ``Sandbox`` keeps up to ``max_workers`` persistent child processes (a fresh interpreter each, started
  on first use, never forked from a threaded parent). A child loads this file and the file that defines the
  function *by path*, not as ``verl_cppo`` modules (importing the package imports verl: seconds per start), so the
  function's module must need only the standard library and third-party packages. It runs ``warmup``
  once, then limits its own address space (``RLIMIT_AS``: what it uses then plus ``memory_mb``) and serves
  calls over its stdin / stdout (``multiprocessing.connection`` framing).
* ``call(*args)`` takes an idle child (or starts one, or waits for one), sends the arguments and waits at
  most ``timeout_s``. On expiry the child is killed (SIGKILL) and the call returns ``Outcome("timeout")``;
  a ``MemoryError`` in the child, or its death, returns ``Outcome("memory")`` / ``Outcome("crashed")`` and
  the child is replaced on the next call. The caller decides what a failed outcome scores; nothing hangs.
* Thread-safe; one call per child at a time. Children exit when their stdin closes (the parent died). A
  forked copy of the owner (a data-loader worker, say) never uses the parent's children: it starts its own.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["Outcome", "Sandbox"]

_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_verl_cppo_sandbox', sys.argv[1])\n"
    "module = sys.modules['_verl_cppo_sandbox'] = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "module._serve(*sys.argv[2:])\n"
)


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok", "timeout", "memory", "crashed", "error"
    value: Any = None  # the function's return value when "ok", else a short reason

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _Child:
    def __init__(self, target: str, warmup: str | None, memory_mb: int, start_timeout_s: float):
        command = [sys.executable, "-c", _BOOTSTRAP, os.path.abspath(__file__), target, str(memory_mb), warmup or ""]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.send = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.receive = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        self.process.stdin.close()
        self.process.stdout.close()
        if not self.receive.poll(start_timeout_s):
            self.kill()
            raise RuntimeError(
                f"verl_cppo.math_task.sandbox: the worker for {target} did not start within {start_timeout_s} s"
            )
        try:
            ready = self.receive.recv()
        except EOFError:
            ready = f"exited (exit code {self.process.wait(timeout=10)})"
        if ready != "ready":
            self.kill()
            raise RuntimeError(f"verl_cppo.math_task.sandbox: the worker for {target} failed to start: {ready}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for conn in (self.send, self.receive):
            conn.close()


def _spec(function: Callable | None) -> str | None:
    """``"<file that defines it>:<name>"`` for a module-level function.

    The file comes from the function's code object, not from ``sys.modules``: verl loads a reward given as a
    file path (``load_extern_object``) without registering its module there, and a user's copy of a reward
    file lives wherever they put it; either way the child loads the same file the caller's function came from.
    """
    if function is None:
        return None
    code = getattr(function, "__code__", None)
    path = code.co_filename if code is not None else None
    if path is None or not os.path.isfile(path) or "." in function.__qualname__:
        raise ValueError(f"Sandbox runs module-level functions of a file, not {function!r}")
    return f"{os.path.abspath(path)}:{function.__name__}"


class Sandbox:
    """Calls ``function`` in child processes, each call bounded by ``timeout_s`` seconds and each child's
    address space by ``memory_mb`` MiB beyond what it holds after loading and ``warmup`` (called once with no
    arguments before the limit is set). Both are module-level functions of a module the child loads by path."""

    def __init__(
        self,
        function: Callable,
        timeout_s: float,
        memory_mb: int,
        max_workers: int = 2,
        warmup: Callable | None = None,
        start_timeout_s: float = 120.0,
    ):
        if not timeout_s > 0 or not memory_mb > 0 or max_workers < 1:
            raise ValueError(
                f"Sandbox needs timeout_s > 0, memory_mb > 0 and max_workers >= 1, got timeout_s={timeout_s!r}, "
                f"memory_mb={memory_mb!r}, max_workers={max_workers!r}"
            )
        self.target, self.warmup = _spec(function), _spec(warmup)
        self.timeout_s, self.memory_mb, self.max_workers = timeout_s, memory_mb, max_workers
        self.start_timeout_s = start_timeout_s
        self._idle: list[_Child] = []
        self._count = 0  # children alive (idle or busy)
        self._cond = threading.Condition()
        self.restarts = 0  # children killed or lost since creation
        self._pid = os.getpid()
        atexit.register(self.close)

    def _forget_inherited(self) -> None:
        """In a forked copy of the owner: the children and pipes are the parent's; start afresh, touching none."""
        self._pid, self._idle, self._count = os.getpid(), [], 0
        self._cond = threading.Condition()

    def _acquire(self) -> _Child:
        if os.getpid() != self._pid:
            self._forget_inherited()
        with self._cond:
            while True:
                if self._idle:
                    return self._idle.pop()
                if self._count < self.max_workers:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            return _Child(self.target, self.warmup, self.memory_mb, self.start_timeout_s)
        except BaseException:
            self._release(None)
            raise

    def _release(self, child: _Child | None) -> None:
        with self._cond:
            if child is None:
                self._count -= 1
            else:
                self._idle.append(child)
            self._cond.notify()

    def call(self, *args: Any) -> Outcome:
        """``target(*args)`` in a child: Outcome("ok", value), or why not ("timeout", "memory", "crashed",
        "error"). Never blocks longer than ``timeout_s`` once a child is free."""
        child = self._acquire()
        keep = False
        try:
            child.send.send(args)
            deadline = time.monotonic() + self.timeout_s
            if not child.receive.poll(max(0.0, deadline - time.monotonic())):
                return Outcome("timeout", f"no result within {self.timeout_s} s")
            status, value = child.receive.recv()
            keep = status in ("ok", "error")
            return Outcome(status, value)
        except (EOFError, OSError) as exc:
            return Outcome("crashed", f"worker exited ({type(exc).__name__}, exit code {child.process.poll()})")
        finally:
            if not keep:
                child.kill()
                self.restarts += 1
            self._release(child if keep else None)

    def close(self) -> None:
        if os.getpid() != self._pid:
            return  # a forked copy: the children are the parent's
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for child in idle:
            child.kill()


# ---------------------------------------------------------------------------------------------- child side


def _resolve(spec: str):
    path, _, name = spec.rpartition(":")
    module_name = "_verl_cppo_sandboxed_" + os.path.splitext(os.path.basename(path))[0]
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        loader_spec.loader.exec_module(module)
    return getattr(module, name)


def _serve(target: str, memory_mb: str, warmup: str) -> None:
    import resource

    memory_mb = int(memory_mb)

    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints of the function go to stderr, not into the protocol
    sys.stdout = sys.stderr
    send, receive = Connection(out_fd, readable=False), Connection(os.dup(0), writable=False)
    try:
        function = _resolve(target)
        if warmup:
            _resolve(warmup)()
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = used + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except Exception as exc:  # reported to the parent, which raises it
        send.send(f"{type(exc).__name__}: {exc}")
        return
    send.send("ready")
    while True:
        try:
            args = receive.recv()
        except EOFError:
            return
        try:
            reply = ("ok", function(*args))
        except MemoryError:
            send.send(("memory", f"over the {memory_mb} MiB limit"))
            return  # start afresh: the heap may be fragmented
        except Exception as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}")
        send.send(reply)
