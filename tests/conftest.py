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

REPORTS: list = []


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
def cross_compiler():
    """cross_compiler(arch): that arch's C compiler, or skip/fail (CI installs them)."""
    from codegen.arches import get_arch

    def get(arch: str) -> str:
        cc = get_arch(arch).compiler()
        need(cc is not None, f"no C compiler for {arch} (Debian: gcc-aarch64-linux-gnu, "
             "gcc-riscv64-linux-gnu)", REQUIRE_TOOLS)
        assert cc is not None
        return cc
    return get


@pytest.fixture(scope="session")
def reports() -> list:
    return REPORTS


_COLUMNS = ("types", "fields", "bitfields", "constants", "ioctls", "enum members",
            "header macros", "struct/union tags")


def pytest_terminal_summary(terminalreporter) -> None:
    """The conformance table: what was compared with the compiler, per kernel x arch."""
    if not REPORTS:
        return
    tr = terminalreporter
    tr.section("conformance against each arch's compiler")
    head = f"{'kernel':24} {'arch':8} " + " ".join(f"{c:>10}" for c in ("types", "fields", "bitfields",
                                                                     "constants", "ioctls", "enums",
                                                                     "macros", "tags")) + " mismatches"
    tr.write_line(head)
    from codegen.headers import version_key
    for r in sorted(REPORTS, key=lambda r: (version_key(r.version) or (999,), r.version, r.arch)):
        cells = " ".join(f"{r.counts.get(c, 0):>10}" for c in _COLUMNS)
        tr.write_line(f"{r.version:24} {r.arch:8} {cells} {len(r.mismatches):>10}")


# ---- KVM and guests ---------------------------------------------------------

GUESTS = ROOT / "tests" / "guests"
# The guests the conformance command runs ship in the package, prebuilt; tests use them too.
BUNDLED_GUESTS = ROOT / "kvm_bindings" / "guests"


def without_capability(monkeypatch, obj, cap) -> None:
    """Make obj (a Kvm or Vm) say it lacks cap, as a kernel without it would. The other
    answers are taken now: check_extension is an ioctl, which a test may then replace."""
    from kvm_bindings import abi
    answers = {c: obj.check_extension(c) for c in abi.Capability}
    monkeypatch.setattr(obj, "check_extension", lambda c: 0 if c == cap else answers[c])


def no_ioctls(monkeypatch, *objs) -> list:
    """Record (instead of issuing) every ioctl on these objects: [(number, arg), ...]."""
    issued: list = []
    for obj in objs:
        monkeypatch.setattr(obj, "ioctl", lambda *a, **k: issued.append(a))
    return issued


def set_kit_env(monkeypatch, device: str | None, require: bool) -> None:
    """Set (or, for None and False, unset) the test kit's KVM_BINDINGS_DEVICE and
    KVM_BINDINGS_REQUIRE_KVM for a pytester run."""
    for name, value in (("KVM_BINDINGS_DEVICE", device),
                        ("KVM_BINDINGS_REQUIRE_KVM", "1" if require else None)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def guest_source(name: str) -> Path:
    """tests/guests/<name>.S, or the bundled kvm_bindings/guests/<name>.S."""
    own = GUESTS / f"{name}.S"
    return own if own.exists() else BUNDLED_GUESTS / f"{name}.S"
LOAD_ADDR = 0x1000


@pytest.fixture(scope="session")
def assemble(tmp_path_factory):
    """assemble(name, base=0x1000) -> bytes of <name>.S (guest_source) linked at base (cached)."""
    need(shutil.which("as") is not None and shutil.which("ld") is not None,
         "GNU as/ld (binutils) are not installed", REQUIRE_TOOLS or REQUIRE_KVM)
    out = tmp_path_factory.mktemp("guests")
    cache: dict[tuple[str, int], bytes] = {}

    def build(name: str, base: int = LOAD_ADDR) -> bytes:
        key = (name, base)
        if key not in cache:
            import subprocess
            obj, binary = out / f"{name}-{base:x}.o", out / f"{name}-{base:x}.bin"
            subprocess.run(["as", "--64", "-o", str(obj), str(guest_source(name))], check=True)
            subprocess.run(["ld", "-m", "elf_x86_64", f"-Ttext={base:#x}", "--oformat", "binary",
                            "-o", str(binary), str(obj)], check=True)
            cache[key] = binary.read_bytes()
        return cache[key]
    return build


@pytest.fixture
def kvm():
    from kvm_bindings import Kvm, KvmUnavailable
    try:
        k = Kvm()
    except KvmUnavailable as e:
        need(False, f"no usable /dev/kvm: {e}", REQUIRE_KVM)
        raise
    with k:
        yield k


@pytest.fixture
def vm(kvm):
    """A VM with 64 KiB of memory at GPA 0 and the TSS placed where Intel needs it."""
    with kvm.create_vm() as v:
        v.set_tss_addr(0xFFFBD000)
        v.add_memory(0, 0x10000)
        yield v


@pytest.fixture
def real_mode(vm, assemble):
    """real_mode(name) -> a vCPU about to run tests/guests/<name>.S in real mode at 0x1000."""
    from kvm_bindings import x86

    def start(name: str, vcpu_id: int = 0):
        vm.memory.write(LOAD_ADDR, assemble(name))
        vcpu = vm.create_vcpu(vcpu_id)
        x86.setup_real_mode(vcpu, LOAD_ADDR)
        return vcpu
    return start


@pytest.fixture
def kit_vm(kvm):
    """A VM as the test kit's plugin makes it: its memory layout (2 MiB at 0) and TSS."""
    from kvm_bindings.testing import MEMORY_SIZE, TSS_ADDR
    with kvm.create_vm() as v:
        v.set_tss_addr(TSS_ADDR)
        v.add_memory(0, MEMORY_SIZE)
        yield v


GDT_ADDR = 0x500


@pytest.fixture
def protected_mode(vm, assemble):
    """protected_mode(name) -> a vCPU about to run a .code32 guest at 0x1000, flat segments."""
    from kvm_bindings import x86

    def start(name: str, vcpu_id: int = 0):
        vm.memory.write(LOAD_ADDR, assemble(name))
        vcpu = vm.create_vcpu(vcpu_id)
        x86.setup_protected_mode(vcpu, vm.memory, LOAD_ADDR, gdt_addr=GDT_ADDR, stack=0x8000)
        return vcpu
    return start
