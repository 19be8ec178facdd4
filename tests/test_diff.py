"""python -m codegen diff: real kernel pairs checked against gcc, synthetic pairs per kind."""

from __future__ import annotations

import json
import os
import re
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
    # a member whose type gcc says is 0 bytes (__DECLARE_FLEX_ARRAY's `struct { } __empty_x`)
    # is not a field
    empty = {(root, path) for root, paths in f["member_types"].items()
             for path, (size, _) in paths.items() if size == 0}
    fields = {(root, path): tuple(v) for root, paths in f["fields"].items() for path, v in paths.items()
              if (root, path) not in empty}
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
    # what the KVM headers merely include never breaks, and is never from the KVM headers
    assert not any(c.breaking for c in report.outside)
    assert all(not c.where.startswith(diff.KVM_HEADERS) for c in report.outside)
    with capsys.disabled():
        counts = {f"{c.kind} {c.what}": 0 for c in report.changes}
        for c in report.changes:
            counts[f"{c.kind} {c.what}"] += 1
        print(f"\n  diff {arch} {old} -> {new}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
              + f"; {len(report.breaking)} breaking")


def test_6_3_to_6_13_breaks_by_moving_s390_and_ppc_out_of_linux_kvm_h(header_set):
    """The README's account: on x86_64 every break is a removal, most of them s390/ppc."""
    header_set("6.3.8")
    header_set("6.13.4")
    report = diff.diff("6.3.8", "6.13.4", get_arch("x86_64"))
    breaking = report.breaking
    assert breaking and all(c.what == "removed" and c.kvm for c in breaking)
    assert len(breaking) == 186
    s390_ppc = [c for c in breaking if re.search(r"s390|S390|KVM_PV_|kvm_pv_|ppc|PPC", c.name)]
    trace = [c for c in breaking if re.search(r"KVM_TRC_|KVM_TRACE_|kvm_user_trace", c.name)
             and c not in s390_ppc]
    assert len(s390_ppc) == 115 and len(trace) == 36
    removed = {c.name for c in report.of("type", "removed")}
    assert {"struct kvm_assigned_pci_dev", "struct kvm_assigned_irq", "struct kvm_assigned_msix_nr",
            "struct kvm_assigned_msix_entry", "struct kvm_debug_guest",
            "struct kvm_user_trace_setup"} <= removed
    removed_ioctls = {c.name: c for c in report.of("ioctl", "removed")}
    assert {"KVM_ASSIGN_PCI_DEVICE", "KVM_DEASSIGN_PCI_DEVICE"} <= removed_ioctls.keys()
    # still #defined in linux/kvm.h, but its struct now lives in s390's asm/kvm.h only
    assert "still in linux/kvm.h" in removed_ioctls["KVM_S390_MEM_OP"].note
    assert "kvm_s390_mem_op" in removed_ioctls["KVM_S390_MEM_OP"].note
    # kvm_run.hypercall's pad became part of a union with the new flags: not a break
    pad = {c.name: c for c in report.of("field", "removed")}["struct kvm_run.hypercall.pad"]
    assert not pad.breaking
    # every type that survives keeps its layout
    assert not report.of("type", "resized") and not report.of("field", "moved")
    # removals are breaking by policy; without them the pair is compatible
    allowed = diff.diff("6.3.8", "6.13.4", get_arch("x86_64"), removals_ok=True)
    assert allowed.breaking == [] and allowed.verdict == "compatible, 186 removals allowed"


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


def _folder(tmp: Path, name: str, text: str, real, extra: dict[str, str] | None = None) -> Path:
    inc = tmp / name
    (inc / "linux").mkdir(parents=True)
    (inc / "linux" / "kvm.h").write_text(text)
    for sub in ("linux", "asm", "asm-generic"):     # the rest of the uapi headers, from a pinned set
        for d in real.include_dirs:
            src = d / sub
            if src.is_dir():
                shutil.copytree(src, inc / sub, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("kvm.h") if sub == "linux" else None)
    for rel, body in (extra or {}).items():
        (inc / rel).write_text(body)
    return inc


def _run_diff(old: Path, new: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codegen", "diff", str(old), str(new), *options],
                          cwd=ROOT, capture_output=True, text=True)


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
                "new": 2, "breaking": False, "where": "linux/kvm.h:9"} in report["changes"]
        assert report["verdict"] == "additions only"


def test_diff_accepts_a_copied_version_folder_and_a_system_include_dir(tmp_path, header_set):
    header_set("6.1.4")
    copy = tmp_path / "copy-of-6.1.4"
    shutil.copytree(headers.version_dir("6.1.4"), copy)
    same = diff.diff("6.1.4", str(copy), get_arch("x86_64"))
    assert same.changes == [] and same.text().splitlines()[-1] == "no changes"
    if Path("/usr/include/linux/kvm.h").exists():
        report = diff.diff("6.1.4", "/usr/include", get_arch("x86_64"))
        assert report.new == "/usr/include"


def test_diff_text_names_each_change_and_the_verdict(header_set):
    header_set("6.19.0")
    header_set("7.2.0")
    proc = subprocess.run([sys.executable, "-m", "codegen", "diff", "6.19.0", "7.2.0"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.stdout.startswith("KVM ABI diff for x86_64: 6.19.0 -> 7.2.0")
    # one break here (kvm_svm_nested_state_hdr grew into its union's padding): singular
    assert "~ type struct kvm_svm_nested_state_hdr resized: 8/8 -> 16/8  [breaking]" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1] == "BREAKING: 1 incompatible change"
    assert proc.returncode == 1


# ---- what counts as KVM ABI ---------------------------------------------------------------

def test_constants_from_a_header_kvm_h_stopped_including_are_not_kvm_breakage(tmp_path, header_set):
    """As 4.19 -> 5.16 on arm64, where asm/ptrace.h stopped including prctl.h (121 PR_*/SVE_*)."""
    real = header_set(headers.shipped_version())
    old = _folder(tmp_path, "old", BASE.replace("#include <linux/types.h>\n",
                                                "#include <linux/types.h>\n#include <linux/psci.h>\n"),
                  real)
    new = _folder(tmp_path, "new", BASE, real)
    proc = _run_diff(old, new, "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["breaking"] == 0 and report["changes"] == []
    assert report["verdict"] == "no changes"
    gone = {c["name"]: c for c in report["outside_kvm_headers"] if c["what"] == "removed"}
    assert "PSCI_0_2_FN_PSCI_VERSION" in gone
    assert gone["PSCI_0_2_FN_PSCI_VERSION"]["where"].startswith("linux/psci.h:")
    assert not any(c["breaking"] for c in gone.values())
    text = _run_diff(old, new).stdout.splitlines()
    assert text[-1] == "no changes"
    heading = next(line for line in text if line.startswith("outside the KVM headers"))
    assert "not KVM ABI" in heading and f"{len(gone)} changes" in heading


HELPER = "#include <linux/types.h>\nstruct helper { __u32 a; };\nstruct helper_arg { __u32 b; };\n" \
         "struct unused_helper { __u32 u; };\n#define HELPER_LIMIT 4\n"
USES_HELPER = BASE.replace("#include <linux/types.h>\n",
                           "#include <linux/types.h>\n#include <linux/kvm_helper.h>\n") + \
    "struct kvm_c { struct helper h[2]; };\n#define KVM_DO3 _IOW(0xAE, 0x04, struct helper_arg)\n"


def test_types_from_other_headers_are_kvm_abi_when_kvm_declarations_use_them(tmp_path, header_set):
    real = header_set(headers.shipped_version())
    grown = HELPER.replace("__u32 a;", "__u32 a; __u32 a2;").replace("__u32 b;", "__u64 b;") \
        .replace("__u32 u;", "__u64 u;").replace("HELPER_LIMIT 4", "HELPER_LIMIT 5")
    old = _folder(tmp_path, "old", USES_HELPER, real, {"linux/kvm_helper.h": HELPER})
    new = _folder(tmp_path, "new", USES_HELPER, real, {"linux/kvm_helper.h": grown})
    proc = _run_diff(old, new, "--json")
    report = json.loads(proc.stdout)
    kvm = {(c["kind"], c["name"], c["what"]): c["breaking"] for c in report["changes"]}
    outside = {(c["kind"], c["name"], c["what"]): c["breaking"] for c in report["outside_kvm_headers"]}
    assert kvm[("type", "struct helper", "resized")]             # an element type of kvm_c
    assert kvm[("type", "struct helper_arg", "resized")]         # an ioctl's argument type
    assert kvm[("type", "struct kvm_c", "resized")]
    assert outside == {("type", "struct unused_helper", "resized"): False,
                       ("field", "struct unused_helper.u", "resized"): False,
                       ("constant", "HELPER_LIMIT", "changed"): False}
    assert proc.returncode == 1
    assert report["verdict"] == f"BREAKING: {report['breaking']} incompatible changes"


@pytest.mark.parametrize("old, new", [("6.1.4", "6.3.8"), ("6.3.8", "6.1.4"),
                                      ("6.19.0", "7.2.0"), ("7.2.0", "6.19.0")])
def test_zero_size_flex_array_helpers_are_not_fields(old, new, header_set):
    """__DECLARE_FLEX_ARRAY's `struct { } __empty_x;` (6.3.8 kvm_nested_state, 7.2.0 kvm_msrs...)."""
    header_set(old)
    header_set(new)
    report = diff.diff(old, new, get_arch("x86_64"))
    assert not [c.name for c in report.changes if "__empty_" in c.name]
    # the flexible arrays themselves are still compared
    snap = diff.snapshot(headers.from_manifest(new, get_arch("x86_64")), get_arch("x86_64"), new)
    assert snap.fields["struct kvm_nested_state"]["data.vmx"] == (128, 0)
    assert snap.fields["struct kvm_msrs"]["entries"] == (8, 0)
    assert not [p for f in snap.fields.values() for p in f if "__empty_" in p]


def test_an_arm64_psci_renumbering_is_reported_apart_and_breaks_nothing(header_set):
    header_set("6.1.4", "arm64")
    header_set("6.3.8", "arm64")
    report = diff.diff("6.1.4", "6.3.8", get_arch("arm64"))
    assert {c.name for c in report.breaking} == {"struct kvm_memory_region", "KVM_SET_MEMORY_REGION",
                                                 "KVM_DIRTY_LOG_PAGE_OFFSET"}
    psci = {c.name: c for c in report.outside if c.name.startswith("PSCI_")}
    assert psci["PSCI_1_1_FN_MEM_PROTECT_CHECK_RANGE"].what == "changed"
    assert psci["PSCI_1_1_FN_MEM_PROTECT_CHECK_RANGE"].where.startswith("linux/psci.h:")
    assert not any(c.breaking for c in psci.values())
    assert report.verdict == "BREAKING: 3 incompatible changes"


# ---- the verdict line --------------------------------------------------------------------

def _snap(label: str, constants: dict, outside: dict | None = None) -> diff.Snapshot:
    where = {n: "linux/kvm.h:1" for n in constants} | {n: "linux/prctl.h:1" for n in outside or {}}
    return diff.Snapshot(label, {}, {}, set(), {**constants, **(outside or {})}, {}, where,
                         set(constants))


@pytest.mark.parametrize("new, removals_ok, verdict", [
    ({"KVM_A": 1, "KVM_B": 2}, False, "no changes"),
    ({"KVM_A": 1, "KVM_B": 2, "KVM_C": 3}, False, "additions only"),
    ({"KVM_A": 1, "KVM_B": 2, "KVM_C": 3, "KVM_D": 4}, False, "additions only"),
    ({"KVM_A": 1}, True, "compatible, 1 removal allowed"),
    ({}, True, "compatible, 2 removals allowed"),
    ({"KVM_A": 1}, False, "BREAKING: 1 incompatible change"),
    ({}, False, "BREAKING: 2 incompatible changes"),
    ({"KVM_A": 1, "KVM_B": 2, "KVM_B_MAX": 9}, False, "compatible, 1 non-breaking change"),
    ({"KVM_A": 1, "KVM_B": 2, "KVM_B_MAX": 9, "KVM_C": 3, "KVM_D": 4}, False,
     "compatible, 1 non-breaking change and 2 additions"),
])
def test_verdict_says_what_happened(new, removals_ok, verdict):
    before = {"KVM_A": 1, "KVM_B": 2}
    if "KVM_B_MAX" in new:
        before["KVM_B_MAX"] = 8         # a sentinel rising: compatible, but not an addition
    old = _snap("old", before, outside={"PR_GONE": 1})
    report = diff.compare(old, _snap("new", new), "x86_64", removals_ok=removals_ok)
    assert report.verdict == verdict
    assert report.text().splitlines()[-1] == verdict
    assert report.to_json()["verdict"] == verdict
    assert [c.name for c in report.outside] == ["PR_GONE"] and not report.outside[0].breaking


# ---- the command line --------------------------------------------------------------------

def test_diff_help_explains_every_argument():
    proc = subprocess.run([sys.executable, "-m", "codegen", "diff", "--help"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0
    entries = [line for line in proc.stdout.splitlines() if re.match(r"  \S", line)]
    names = {re.split(r"\s{2,}", e.strip())[0] for e in entries}
    assert names == {"old", "new", "-h, --help", "--arch ARCH", "--json", "--removals-ok"}
    for e in entries:
        assert len(re.split(r"\s{2,}", e.strip())) == 2, f"no help for {e.strip()!r}"


def test_text_report_says_what_its_numbers_mean(header_set):
    header_set("5.16.2")
    header_set("6.1.4")
    text = diff.diff("5.16.2", "6.1.4", get_arch("x86_64")).text()
    assert "~ field struct kvm_run.system_event resized: 32/16 -> 32/136" in text
    legend = text[:text.index("\ntypes:")]
    assert "type: size/align in bytes" in legend and "field: offset/size in bytes" in legend
    assert "bits OFFSET+WIDTH" in legend
    assert "linux/kvm.h and asm/kvm.h" in legend
