"""The generated bindings against the C compiler, for every pinned kernel.

gcc compiles a probe against the same headers and reports sizeof, _Alignof,
offsetof, bitfield positions and every constant's value; ctypes reports its own
view of the generated classes. They must agree exactly, and gcc's macro list and
struct tags must all be accounted for in the module.
"""

from __future__ import annotations

import ctypes
import json

import pytest

from codegen import conformance, headers, pipeline
from codegen.arches import SHIPPED_ARCHES, get_arch

MANIFEST = headers.load_manifest()["versions"]
MATRIX = [(v, a) for v in headers.manifest_versions() for a in MANIFEST[v]["arches"]]


@pytest.mark.parametrize("version, arch", MATRIX, ids=[f"{v}-{a}" for v, a in MATRIX])
def test_every_type_field_constant_and_ioctl_matches_the_arch_compiler(version, arch, header_set,
                                                                       cross_compiler, reports):
    cross_compiler(arch)
    report = conformance.run(header_set(version, arch), get_arch(arch))
    reports.append(report)
    assert report.mismatches == []
    assert report.counts["types"] > 100 and report.counts["ioctls"] > 75


@pytest.mark.parametrize("arch", SHIPPED_ARCHES)
def test_shipped_module_matches_the_facts_stored_with_it(arch):
    """Runs without a compiler or headers: the probe's output for the shipped version is packaged."""
    import importlib
    from importlib import resources

    mod = importlib.import_module(f"kvm_bindings.abi.{arch}")
    facts = json.loads(resources.files("kvm_bindings.abi").joinpath(f"{arch}_facts.json").read_text())
    assert facts["kernel"] == mod.KERNEL_VERSION and facts["arch"] == arch
    report = conformance.Report(mod.KERNEL_VERSION, arch)
    conformance.compare(mod, facts, report)
    assert report.mismatches == []
    assert report.counts["fields"] == sum(len(v) for v in facts["fields"].values())


def test_committed_bindings_are_what_the_generator_writes(header_set):
    header_set(headers.shipped_version())
    assert pipeline.check() == []


def _mutated(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def test_conformance_catches_a_wrong_field_type(header_set):
    """The check must be able to fail: break one member and one constant on purpose."""
    arch = get_arch("x86_64")
    hs = header_set(headers.shipped_version())
    files = pipeline.generate(hs, arch)
    facts = json.loads(files["x86_64_facts.json"])
    text = files["x86_64.py"]
    text = _mutated(text, '    ("rax", ctypes.c_uint64),', '    ("rax", ctypes.c_uint64 * 2),')
    text = _mutated(text, "\nKVM_RUN = 0xae80\n", "\nKVM_RUN = 0xae81\n")
    text = _mutated(text, 'Ioctl("KVM_RUN", 0xae80,', 'Ioctl("KVM_RUN", 0xae81,')
    files["x86_64.py"] = text
    mod = conformance.load_generated(files, arch)
    report = conformance.Report("mutated", "x86_64")
    conformance.compare(mod, facts, report)
    joined = "\n".join(report.mismatches)
    assert "struct kvm_regs.rax" in joined          # wrong size
    assert "struct kvm_regs.rflags" in joined       # and every member after it moved
    assert "KVM_RUN:" in joined and "ioctl KVM_RUN" in joined
    assert ctypes.sizeof(mod.kvm_regs) != facts["types"]["struct kvm_regs"][0]


def test_shipped_module_covers_what_the_issue_asks_for():
    from kvm_bindings import abi
    assert abi.KERNEL_VERSION == headers.shipped_version()
    assert len(abi.C_TYPES) >= 110
    assert len(abi.Capability) >= 240
    assert len(abi.ExitReason) == 44           # 0 (UNKNOWN) .. 43 in Linux 7.2
    assert [int(r) for r in abi.ExitReason] == list(range(44))
    assert len(abi.IOCTLS) >= 119


def test_a_system_include_directory_works_like_a_pinned_version(gcc, reports):
    """--include-dir: the distro's own headers (Debian's linux-libc-dev) generate and conform."""
    from pathlib import Path

    from .conftest import REQUIRE_TOOLS, need
    need(Path("/usr/include/linux/kvm.h").exists(), "no /usr/include/linux/kvm.h (linux-libc-dev)",
         REQUIRE_TOOLS)
    arch = get_arch("x86_64")
    report = conformance.run(headers.from_include_dir(Path("/usr/include"), arch), arch)
    report.version += " (/usr/include)"
    reports.append(report)
    assert report.mismatches == []
