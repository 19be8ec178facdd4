"""Enum classes mean membership: each holds exactly its family, declared in codegen/families.py.

The oracles are the headers' own grouping (the blank-line blocks their authors put each
family in, and the member lists of C enums as gcc preprocesses them) and gcc's values;
the declared exclusions are the only other input. Conformance (test_conformance.py)
runs the gcc side for every pinned version x arch; this file pins the known cases.
"""

from __future__ import annotations

import enum
import importlib
import json
import re
from importlib import resources
from pathlib import Path

import pytest

from codegen import conformance, headers, pipeline
from codegen.arches import SHIPPED_ARCHES, get_arch
from codegen.families import FAMILIES

from .conftest import ROOT

BY_NAME = {fam.name: fam for fam in FAMILIES}


def _modules(arch: str):
    return (importlib.import_module(f"kvm_bindings.abi.{arch}"),
            importlib.import_module(f"kvm_bindings.abi.{arch}_enums"))


def _gcc_constants(arch: str) -> dict:
    text = resources.files("kvm_bindings.abi").joinpath(f"{arch}_facts.json").read_text()
    return json.loads(text)["constants"]


# (arch, class, C name): things that share a family's prefix but are not members.
NON_MEMBERS = [
    ("x86_64", "IrqRoutingType", "KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL"),   # a priority
    ("x86_64", "DirtyLogFlag", "KVM_DIRTY_LOG_PAGE_OFFSET"),                 # an mmap offset
    ("arm64", "DirtyLogFlag", "KVM_DIRTY_LOG_PAGE_OFFSET"),
    ("riscv64", "DirtyLogFlag", "KVM_DIRTY_LOG_PAGE_OFFSET"),
    ("x86_64", "MsrExitReason", "KVM_MSR_EXIT_REASON_VALID_MASK"),           # a mask
    ("x86_64", "SyncRegs", "KVM_SYNC_X86_VALID_FIELDS"),                     # a mask
    ("x86_64", "DeviceType", "KVM_DEV_TYPE_MAX"),                            # sentinels
    ("x86_64", "SevCmdId", "KVM_SEV_NR_MAX"),
    ("x86_64", "TdxCmdId", "KVM_TDX_CMD_NR_MAX"),
    ("riscv64", "RiscvIsaExtId", "KVM_RISCV_ISA_EXT_MAX"),
    ("riscv64", "RiscvSbiExtId", "KVM_RISCV_SBI_EXT_MAX"),
    ("x86_64", "ExitReason", "KVM_EXIT_IO_OUT"),                             # IoDirection's
    ("x86_64", "ExitReason", "KVM_EXIT_HYPERV_HCALL"),                       # kvm_hyperv_exit.type
    ("arm64", "SystemEvent", "KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2"),      # a data[0] bit
]


@pytest.mark.parametrize("arch, cls_name, c_name", NON_MEMBERS,
                         ids=[f"{a}-{c}" for a, _, c in NON_MEMBERS])
def test_a_non_member_is_a_plain_int_with_gccs_value_and_not_in_the_class(arch, cls_name, c_name):
    mod, enums = _modules(arch)
    fam = BY_NAME[cls_name]
    cls = getattr(enums, cls_name)
    short = c_name[len(fam.prefix):]
    value = _gcc_constants(arch)[c_name]

    assert fam.excludes(c_name)
    assert short not in cls.__members__ and c_name not in cls.__members__
    if not c_name.startswith(("KVM_EXIT_", "KVM_SYSTEM_EVENT_")):   # those reuse small ints
        assert value not in {m.value for m in cls}
    assert getattr(mod, c_name) == value and type(getattr(mod, c_name)) is int
    assert len(cls) > 0


def test_masks_would_be_flag_combinations_not_members():
    _, enums = _modules("x86_64")
    assert enums.MsrExitReason.INVAL | enums.MsrExitReason.UNKNOWN | enums.MsrExitReason.FILTER \
        == _gcc_constants("x86_64")["KVM_MSR_EXIT_REASON_VALID_MASK"]
    assert list(enums.SyncRegs.__members__) == ["REGS", "SREGS", "EVENTS"]   # not iteration:
    assert list(enums.MsrExitReason.__members__) == ["INVAL", "UNKNOWN", "FILTER"]  # skips masks


@pytest.mark.parametrize("arch", SHIPPED_ARCHES)
def test_one_class_per_c_enum_and_no_member_keeps_a_c_prefix(arch):
    mod, enums = _modules(arch)
    classes = {n: c for n, c in vars(enums).items()
               if isinstance(c, type) and issubclass(c, enum.Enum) and c.__module__ == enums.__name__}
    assert "KvmDeviceType" not in classes and not hasattr(mod, "KvmDeviceType")
    origins = [re.search(r"enum (\w+) \(", c.__doc__ or "") for c in classes.values()]
    tags = [m.group(1) for m in origins if m]
    assert len(tags) == len(set(tags)) and "kvm_device_type" in tags
    for name, cls in classes.items():
        assert name in BY_NAME, f"{name} is not declared in codegen/families.py"
        for member in cls.__members__:
            assert not member.startswith("KVM_"), f"{name}.{member}"
    assert mod.DeviceType is enums.DeviceType
    assert enums.DeviceType.VFIO == _gcc_constants(arch)["KVM_DEV_TYPE_VFIO"]


def test_c_enum_members_lose_their_prefix():
    _, enums = _modules("x86_64")
    k = _gcc_constants("x86_64")
    assert enums.SevCmdId.INIT == k["KVM_SEV_INIT"] and enums.SevCmdId.SNP_LAUNCH_START == 100
    assert enums.TdxCmdId.INIT_VM == k["KVM_TDX_INIT_VM"]
    assert "KVM_SEV_INIT" not in enums.SevCmdId.__members__


def _blocks(path: Path) -> dict[str, int]:
    """Macro name -> index of its block, a block being a run of lines without a blank one."""
    out: dict[str, int] = {}
    block = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            block += 1
            continue
        m = re.match(r"\s*#\s*define\s+(\w+)", line)
        if m:
            out.setdefault(m.group(1), block)
    return out


PINNED = [(v, a) for v in headers.manifest_versions()
          for a in headers.load_manifest()["versions"][v]["arches"]]


@pytest.mark.parametrize("version, arch", PINNED, ids=[f"{v}-{a}" for v, a in PINNED])
def test_each_macro_familys_members_sit_in_one_block_of_each_header(version, arch):
    """The header's authors group a family in one block per file; a member found in a
    second block (XEN_EVTCHN_PRIO_2LEVEL, SYNC_X86_VALID_FIELDS, DIRTY_LOG_PAGE_OFFSET)
    is a different thing that shares the prefix."""
    root = ROOT / "headers" / version
    files = [root / "common" / "linux" / "kvm.h", root / arch / "asm" / "kvm.h"]
    if not all(f.exists() for f in files):
        pytest.skip(f"headers for {version} are not fetched")
    checked = 0
    for f in files:
        where = _blocks(f)
        for fam in FAMILIES:
            if fam.enum is not None:
                continue
            members = {n: b for n, b in where.items() if n.startswith(fam.prefix) and not fam.excludes(n)}
            assert len(set(members.values())) <= 1, f"{fam.name} in {f}: {sorted(members)}"
            checked += len(members)
    assert checked > 150


@pytest.mark.parametrize("version, arch", PINNED, ids=[f"{v}-{a}" for v, a in PINNED])
def test_every_c_enum_in_a_pinned_header_is_declared_once(version, arch):
    root = ROOT / "headers" / version
    files = [root / "common" / "linux" / "kvm.h", root / arch / "asm" / "kvm.h"]
    if not all(f.exists() for f in files):
        pytest.skip(f"headers for {version} are not fetched")
    tags = {t for f in files for t in re.findall(r"\benum\s+(\w+)\s*\{", f.read_text(errors="replace"))}
    declared = [fam.enum for fam in FAMILIES if fam.enum is not None]
    assert tags and tags <= set(declared), sorted(tags - set(declared))
    assert len(declared) == len(set(declared))


def test_every_exclusion_has_a_reason_and_names_something_in_a_pinned_header():
    names: set[str] = set()
    pinned = [*(ROOT / "headers").glob("*/*/*/kvm.h"), *(ROOT / "headers").glob("*/*/asm/bootparam.h")]
    for h in pinned:
        names |= set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", h.read_text(errors="replace")))
    assert len(names) > 1000
    for fam in FAMILIES:
        for x in fam.exclude:
            assert x.reason and "\n" not in x.reason and len(x.reason) > 10
            assert any(re.fullmatch(x.pattern, n) for n in names), f"{fam.name}: {x.pattern} is dead"
            assert x.pattern.startswith(fam.prefix)


def _x86_files(header_set):
    arch = get_arch("x86_64")
    hs = header_set(headers.shipped_version())
    return hs, arch, pipeline.generate(hs, arch, with_facts=True)


def _mismatches(hs, arch, files) -> str:
    facts = json.loads(files["x86_64_facts.json"])
    mod = conformance.load_generated(files, arch)
    report = conformance.Report("mutated", "x86_64")
    conformance.compare(mod, facts, report)
    conformance.check_coverage(mod, facts, hs, arch, report)
    return "\n".join(report.mismatches)


def test_conformance_catches_a_non_member_that_sneaks_back_in(header_set):
    """The membership check must be able to fail: put excluded values back on purpose."""
    hs, arch, files = _x86_files(header_set)
    assert _mismatches(hs, arch, files) == ""
    text = files["x86_64_enums.py"]
    for cls, line in [("MsrExitReason", "    VALID_MASK = 7\n"),
                      ("DirtyLogFlag", "    PAGE_OFFSET = 64\n"),
                      ("IrqRoutingType", "    XEN_EVTCHN_PRIO_2LEVEL = 4294967295\n"),
                      ("SevCmdId", "    NR_MAX = 104\n")]:
        head = text.index(f"\nclass {cls}(")
        body = text.index('"""\n\n', text.index('"""', head) + 3) + 5
        text = text[:body] + line + text[body:]
    files["x86_64_enums.py"] = text
    joined = _mismatches(hs, arch, files)
    assert "MsrExitReason has KVM_MSR_EXIT_REASON_VALID_MASK" in joined
    assert "MsrExitReason.VALID_MASK = 0x7 is not a single bit" in joined
    assert "DirtyLogFlag has KVM_DIRTY_LOG_PAGE_OFFSET" in joined
    assert "IrqRoutingType has KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL" in joined
    assert "SevCmdId has KVM_SEV_NR_MAX" in joined


def test_conformance_catches_a_member_left_out(header_set):
    hs, arch, files = _x86_files(header_set)
    files["x86_64_enums.py"] = files["x86_64_enums.py"].replace("    SNP_LAUNCH_UPDATE = 101\n", "", 1)
    assert "SevCmdId lacks KVM_SEV_SNP_LAUNCH_UPDATE" in _mismatches(hs, arch, files)
