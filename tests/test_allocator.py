"""dmlgen.engine.allocator: freed memory stays in the process (glibc mallopt), with opt-outs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

import dmlgen.cli as cli
from dmlgen.engine import allocator

GLIBC_LINUX = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# 20 rounds of a 40 MB buffer, after 5 untimed ones: above glibc's largest dynamic mmap threshold (32 MB), so
# with the defaults each round maps fresh pages and page-faults all ~10k of them in; tuned, the heap keeps the
# block and the rounds reuse it (0-40k faults in all here, where the kernel reclaims idle pages now and then).
_CHILD = """
import json, resource, sys, torch
from dmlgen.engine.allocator import tune_glibc_malloc
applied = tune_glibc_malloc()
for _ in range(5):
    buffer = torch.ones(10_000_000)
    del buffer
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    buffer = torch.ones(10_000_000)
    del buffer
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _child(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in allocator.GLIBC_VARIABLES}
    env[allocator.OPT_OUT] = setting
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuning_applies_on_glibc_and_stops_the_page_faults_of_reused_buffers() -> None:
    tuned, defaults = _child("1"), _child("0")
    assert tuned["applied"] is GLIBC_LINUX and defaults["applied"] is False
    if GLIBC_LINUX:
        assert defaults["faults"] > 150_000
        assert tuned["faults"] < defaults["faults"] / 3


def test_opt_out_and_users_own_malloc_variables_are_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(allocator.OPT_OUT, "0")
    assert allocator.tune_glibc_malloc() is False
    monkeypatch.delenv(allocator.OPT_OUT)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert allocator.tune_glibc_malloc() is False


def test_the_command_tunes_before_running(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls = []
    monkeypatch.setattr(cli, "tune_glibc_malloc", lambda: calls.append(True) or True)
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2  # the handler ran and reported the file
    assert calls == [True]
