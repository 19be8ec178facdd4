"""python -m kvm_bindings demo / info, and the bundled demo guest."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources

import pytest

from .conftest import BUNDLED_GUESTS, ROOT


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvm_bindings", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_demo_prints_the_guests_greeting_and_its_exits(kvm):
    out = _run("demo")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Hello from a KVM guest, run by kvm-bindings!\n")
    assert "IoExit x45" in out.stdout and "HltExit x1" in out.stdout


def test_info_reports_every_capability(kvm):
    out = _run("info", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["api_version"] == 12
    assert report["capabilities"]["KVM_CAP_USER_MEMORY"] > 0
    assert len(report["capabilities"]) >= 240
    assert report["supported_cpuid_entries"] > 0 and report["msr_indices"] > 0
    text = _run("info")
    assert "capabilities" in text.stdout and "KVM_CAP_IRQCHIP" in text.stdout


@pytest.mark.parametrize("name", sorted(p.stem for p in BUNDLED_GUESTS.glob("*.S")))
def test_each_bundled_guest_is_its_source_assembled(assemble, name):
    """guests/*.bin ship so the demo and the conformance checks need no assembler: each must
    be its .S, assembled and linked at 0x1000."""
    guests = resources.files("kvm_bindings").joinpath("guests")
    assert guests.joinpath(f"{name}.bin").read_bytes() == assemble(name)


def test_every_bundled_guest_source_has_its_binary_and_no_binary_is_orphaned():
    sources = {p.stem for p in BUNDLED_GUESTS.glob("*.S")}
    assert sources == {p.stem for p in BUNDLED_GUESTS.glob("*.bin")} and len(sources) >= 11
