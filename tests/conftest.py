"""Shared fixtures: header sets, the C compiler, /dev/kvm, and a summary of what was checked."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# CI sets these so that a missing tool fails the run instead of skipping tests.
REQUIRE_TOOLS = os.environ.get("KVM_BINDINGS_REQUIRE_TOOLS") == "1"
REQUIRE_KVM = os.environ.get("KVM_BINDINGS_REQUIRE_KVM") == "1"

SUMMARIES: list[str] = []


def need(ok: bool, reason: str, required: bool) -> None:
    """Skip when something this test needs is absent, or fail where it is required."""
    if ok:
        return
    if required:
        pytest.fail(f"{reason} (required: this environment sets KVM_BINDINGS_REQUIRE_*)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def gcc() -> str:
    path = shutil.which("gcc")
    need(path is not None, "gcc is not installed", REQUIRE_TOOLS)
    assert path is not None
    return path


@pytest.fixture(scope="session")
def header_set(gcc):
    """header_set(version, arch) -> HeaderSet, for a fetched manifest version."""
    from codegen import headers
    from codegen.arches import get_arch
    from codegen.errors import GeneratorError

    def get(version: str, arch: str = "x86_64"):
        try:
            return headers.from_manifest(version, get_arch(arch))
        except GeneratorError as e:
            need(False, f"{e} (run `python -m codegen fetch-headers`)", REQUIRE_TOOLS)
    return get


@pytest.fixture(scope="session")
def summaries() -> list[str]:
    return SUMMARIES


def pytest_terminal_summary(terminalreporter) -> None:
    if SUMMARIES:
        terminalreporter.section("what conformance checked")
        for line in SUMMARIES:
            terminalreporter.write_line(line)
