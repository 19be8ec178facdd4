"""python -m kvm_bindings demo / info, and the bundled demo guest."""

from __future__ import annotations

import fcntl
import json
import os
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


# _IO(KVMIO, 0x03), spelled out: the answers below must not come from the code under test.
KVM_CHECK_EXTENSION = 0xAE03


def raw_supported(capability: str | None) -> bool:
    """Whether /dev/kvm reports capability, asked with a bare ioctl (None: the base API)."""
    from kvm_bindings import abi
    if capability is None:
        return True
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(fd, KVM_CHECK_EXTENSION, abi.Capability[capability[8:]]) > 0
    finally:
        os.close(fd)


def test_info_marks_each_call_as_the_kernel_answers_its_capability(kvm):
    import kvm_bindings
    report = json.loads(_run("info", "--json").stdout)
    calls = report["calls"]
    assert list(calls) == ["system", "vm", "vcpu", "device"]
    classes = {"system": kvm_bindings.Kvm, "vm": kvm_bindings.Vm, "vcpu": kvm_bindings.Vcpu,
               "device": kvm_bindings.Device}
    answers = set()
    for fd, group in calls.items():
        for call in group:
            attr = "__init__" if call["method"].endswith("()") else call["method"].partition(".")[2]
            assert hasattr(classes[fd], attr), call
            assert call["supported"] == raw_supported(call["capability"]), call
            answers.add(call["supported"])
    methods = {fd: [c["method"] for c in group] for fd, group in calls.items()}
    assert "Kvm()" in methods["system"] and "vm.create_vcpu" in methods["vm"]
    assert "vcpu.run" in methods["vcpu"] and "device.set_attr" in methods["device"]
    assert True in answers


def test_info_text_lists_the_calls_by_fd_marked_yes_or_no(kvm):
    lines = _run("info").stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("calls "))
    fd = None
    seen = 0
    for line in lines[start + 1:]:
        if line.startswith("  ") and not line.startswith("    "):
            fd = line.split()[0]
            continue
        method, mark, *cap = line.split()
        assert mark == ("yes" if raw_supported(cap[0] if cap else None) else "no"), line
        assert fd in ("system", "vm", "vcpu", "device")
        seen += 1
    total = int(lines[start].split()[3])
    assert seen == total > 50


def test_calls_markdown_is_the_rendering_of_every_arch_table():
    from kvm_bindings import _calls
    from kvm_bindings.__main__ import call_tables, host_calls
    out = _run("calls", "--markdown")
    assert out.returncode == 0, out.stderr
    assert out.stdout == _calls.markdown(call_tables())
    plain = _run("calls").stdout
    assert all(f"  {c.method} " in plain for c in host_calls())


@pytest.mark.parametrize("name", sorted(p.stem for p in BUNDLED_GUESTS.glob("*.S")))
def test_each_bundled_guest_is_its_source_assembled(assemble, name):
    """guests/*.bin ship so the demo and the conformance checks need no assembler: each must
    be its .S, assembled and linked at 0x1000."""
    guests = resources.files("kvm_bindings").joinpath("guests")
    assert guests.joinpath(f"{name}.bin").read_bytes() == assemble(name)


def test_every_bundled_guest_source_has_its_binary_and_no_binary_is_orphaned():
    sources = {p.stem for p in BUNDLED_GUESTS.glob("*.S")}
    assert sources == {p.stem for p in BUNDLED_GUESTS.glob("*.bin")} and len(sources) >= 11
