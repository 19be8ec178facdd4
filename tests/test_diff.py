"""python -m codegen diff: real kernel pairs checked against gcc, synthetic pairs per kind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from codegen import diff, headers, pipeline
from codegen.arches import get_arch

from .conftest import ROOT

MANIFEST = headers.load_manifest()["versions"]
VERSIONS = headers.manifest_versions()


def _pairs(arch: str) -> list[tuple[str, str]]:
    have = [v for v in VERSIONS if arch in MANIFEST[v]["arches"]]
    return sorted(set(zip(have, have[1:])) | {(have[0], have[-1])})


PAIRS = [(o, n, a) for a in ("x86_64", "arm64", "riscv64") for o, n in _pairs(a)]


@pytest.fixture(scope="session")
def facts(header_set, cross_compiler):
    """facts(version, arch): what the arch's compiler says about that kernel (cached)."""
    cache: dict = {}

    def get(version: str, arch: str) -> dict:
        if (version, arch) not in cache:
            cross_compiler(arch)
            files = pipeline.generate(header_set(version, arch), get_arch(arch))
            cache[version, arch] = json.loads(files[f"{arch}_facts.json"])
        return cache[version, arch]
    return get


def _gcc_view(f: dict) -> tuple[dict, dict, dict]:
    fields = {(root, path): tuple(v) for root, paths in f["fields"].items() for path, v in paths.items()}
    fields.update({(root, path): ("bits", *v) for root, paths in f["bitfields"].items()
                   for path, v in paths.items()})
    return {k: tuple(v) for k, v in f["types"].items()}, fields, f["constants"]


@pytest.mark.parametrize("old, new, arch", PAIRS, ids=[f"{o}-{n}-{a}" for o, n, a in PAIRS])
def test_real_pair_reports_exactly_what_gcc_sees_change(old, new, arch, facts, header_set, capsys):
    header_set(old, arch)
    header_set(new, arch)
    report = diff.diff(old, new, get_arch(arch))
    old_types, old_fields, old_consts = _gcc_view(facts(old, arch))
    new_types, new_fields, new_consts = _gcc_view(facts(new, arch))

    def names(kind, what):
        return {c.name for c in report.of(kind, what)}

    assert names("type", "added") == new_types.keys() - old_types.keys()
    assert names("type", "removed") == old_types.keys() - new_types.keys()
    assert names("type", "resized") == {t for t in old_types.keys() & new_types.keys()
                                         if old_types[t] != new_types[t]}
    gcc_moved = {f"{r}.{p}" for (r, p) in old_fields.keys() & new_fields.keys()
                 if old_fields[r, p] != new_fields[r, p]}
    assert names("field", "moved") | names("field", "resized") == gcc_moved
    survivors = old_types.keys() & new_types.keys()
    assert names("field", "removed") == {f"{r}.{p}" for (r, p) in old_fields.keys() - new_fields.keys()
                                         if r in survivors}
    # constants (macros and enum members) and ioctls together are gcc's constants
    macro_names = {c.name for c in report.changes if c.kind in ("constant", "ioctl")}
    gcc_changed = {n for n in old_consts.keys() & new_consts.keys() if old_consts[n] != new_consts[n]}
    assert {c.name for c in report.changes if c.what in ("changed", "renumbered")} == gcc_changed
    assert macro_names <= (old_consts.keys() | new_consts.keys())
    with capsys.disabled():
        counts = {f"{c.kind} {c.what}": 0 for c in report.changes}
        for c in report.changes:
            counts[f"{c.kind} {c.what}"] += 1
        print(f"\n  diff {arch} {old} -> {new}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
              + f"; {len(report.breaking)} breaking")


def test_device_assignment_and_old_debug_abi_disappear_between_6_3_and_6_13(header_set):
    header_set("6.3.8")
    header_set("6.13.4")
    report = diff.diff("6.3.8", "6.13.4", get_arch("x86_64"))
    removed = {c.name for c in report.of("type", "removed")}
    assert {"struct kvm_assigned_pci_dev", "struct kvm_assigned_irq", "struct kvm_assigned_msix_nr",
            "struct kvm_assigned_msix_entry", "struct kvm_debug_guest",
            "struct kvm_user_trace_setup"} <= removed
    removed_ioctls = {c.name for c in report.of("ioctl", "removed")}
    assert {"KVM_ASSIGN_PCI_DEVICE", "KVM_DEASSIGN_PCI_DEVICE"} <= removed_ioctls
    assert report.breaking and all(c.what == "removed" for c in report.breaking)
    # every type that survives keeps its layout
    assert not report.of("type", "resized") and not report.of("field", "moved")
    # removals are breaking by policy; without them the pair is additions only
    assert diff.diff("6.3.8", "6.13.4", get_arch("x86_64"), removals_ok=True).breaking == []


def test_kvm_run_system_event_grew_without_breaking_anything(header_set):
    """Linux 5.18 gave system_event ndata and data[16] in place of flags: old fields stay put."""
    header_set("5.16.2")
    header_set("6.1.4")
    report = diff.diff("5.16.2", "6.1.4", get_arch("x86_64"))
    grown = {c.name: c for c in report.of("field", "resized")}["struct kvm_run.system_event"]
    assert not grown.breaking and grown.new[1] > grown.old[1]
    assert {"struct kvm_run.system_event.ndata", "struct kvm_run.system_event.data"} <= \
        {c.name for c in report.of("field", "added")}


# ---- synthetic pairs: one incompatibility each -----------------------------------------

BASE = """#include <linux/ioctl.h>
#include <linux/types.h>
struct kvm_a { __u32 x; __u32 pad; __u64 y; };
struct kvm_b { __u64 z; };
#define KVM_CAP_OLD 1
#define KVM_LIMIT 10
#define KVM_DO _IOW(0xAE, 0x01, struct kvm_a)
"""

CASES = {
    # name: (new header, expected (kind, what) that breaks; None for additions only)
    "additions_only": (BASE + "struct kvm_c { __u8 c; };\n#define KVM_CAP_NEW 2\n"
                       "#define KVM_DO2 _IO(0xAE, 0x02)\n", None),
    "field_in_padding": (BASE.replace("__u32 pad;", "__u16 flags; __u16 pad;"), None),
    "type_removed": (BASE.replace("struct kvm_b { __u64 z; };\n", ""), ("type", "removed")),
    "size_changed": (BASE.replace("struct kvm_b { __u64 z; };", "struct kvm_b { __u64 z; __u64 w; };"),
                     ("type", "resized")),
    "alignment_changed": (BASE.replace("struct kvm_b { __u64 z; };",
                                       "struct kvm_b { __u64 z; } __attribute__((aligned(16)));"),
                          ("type", "resized")),
    "field_removed": (BASE.replace("__u32 x; __u32 pad;", "__u32 pad0; __u32 pad;"),
                      ("field", "removed")),
    "field_moved": (BASE.replace("__u32 x; __u32 pad; __u64 y;", "__u32 pad; __u32 x; __u64 y;"),
                    ("field", "moved")),
    "field_resized": (BASE.replace("__u32 x; __u32 pad;", "__u64 x;").replace("__u64 y;", "__u64 y;"),
                      ("field", "resized")),
    "constant_changed": (BASE.replace("KVM_LIMIT 10", "KVM_LIMIT 20"), ("constant", "changed")),
    "constant_removed": (BASE.replace("#define KVM_LIMIT 10\n", ""), ("constant", "removed")),
    "ioctl_renumbered": (BASE.replace("0x01, struct kvm_a", "0x03, struct kvm_a"), ("ioctl", "renumbered")),
}


def _folder(tmp: Path, name: str, text: str, real) -> Path:
    inc = tmp / name
    (inc / "linux").mkdir(parents=True)
    (inc / "linux" / "kvm.h").write_text(text)
    for sub in ("linux", "asm", "asm-generic"):     # the rest of the uapi headers, from a pinned set
        for d in real.include_dirs:
            src = d / sub
            if src.is_dir():
                shutil.copytree(src, inc / sub, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("kvm.h") if sub == "linux" else None)
    return inc


@pytest.mark.parametrize("case", sorted(CASES))
def test_synthetic_pair(case, tmp_path, header_set):
    real = header_set(headers.shipped_version())
    new_text, expected = CASES[case]
    old = _folder(tmp_path, "old", BASE, real)
    new = _folder(tmp_path, "new", new_text, real)
    proc = subprocess.run([sys.executable, "-m", "codegen", "diff", str(old), str(new), "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    report = json.loads(proc.stdout)
    breaking = {(c["kind"], c["what"]) for c in report["changes"] if c["breaking"]}
    if expected is None:
        assert proc.returncode == 0 and breaking == set(), report
        assert any(c["what"] == "added" for c in report["changes"])
    else:
        assert proc.returncode == 1 and expected in breaking, report
    if case == "additions_only":
        assert {"kind": "capability", "name": "KVM_CAP_NEW", "what": "added", "old": None,
                "new": 2, "breaking": False} in report["changes"]


def test_diff_accepts_a_copied_version_folder_and_a_system_include_dir(tmp_path, header_set):
    header_set("6.1.4")
    copy = tmp_path / "copy-of-6.1.4"
    shutil.copytree(headers.version_dir("6.1.4"), copy)
    same = diff.diff("6.1.4", str(copy), get_arch("x86_64"))
    assert same.changes == [] and "compatible" in same.text()
    if Path("/usr/include/linux/kvm.h").exists():
        report = diff.diff("6.1.4", "/usr/include", get_arch("x86_64"))
        assert report.new == "/usr/include"


def test_diff_text_names_each_change_and_the_verdict(header_set):
    header_set("6.19.0")
    header_set("7.2.0")
    proc = subprocess.run([sys.executable, "-m", "codegen", "diff", "6.19.0", "7.2.0"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.stdout.startswith("KVM ABI diff for x86_64: 6.19.0 -> 7.2.0")
    assert proc.stdout.rstrip().splitlines()[-1].startswith(("BREAKING", "compatible"))
    assert proc.returncode == (1 if "BREAKING" in proc.stdout else 0)
