"""python -m kvm_bindings demo / info, and the bundled demo guest."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources

from .conftest import ROOT


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


def test_bundled_demo_guest_is_its_source_assembled(assemble, tmp_path):
    """guests/greeting.bin ships so the demo needs no assembler; it must be greeting.S."""
    guests = resources.files("kvm_bindings").joinpath("guests")
    obj, binary = tmp_path / "g.o", tmp_path / "g.bin"
    with resources.as_file(guests.joinpath("greeting.S")) as src:
        subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=0x1000", "--oformat", "binary", "-o",
                    str(binary), str(obj)], check=True)
    assert guests.joinpath("greeting.bin").read_bytes() == binary.read_bytes()
