"""Functions a verl_cppo.math_task.sandbox child runs in tests/math_task/test_sandbox.py (loaded there by path:
stdlib only)."""

import os
import time


def echo(*args):
    return args


def sleep(seconds):
    time.sleep(seconds)
    return "woke"


def allocate(megabytes):
    block = bytearray(megabytes * 2**20)
    return len(block)


def die(code):
    os._exit(code)


def fail(message):
    raise ValueError(message)


def pid():
    return os.getpid()
