"""Each generated Ioctl's fd kinds and capability, read from kvm.h's comments, against an
oracle we did not write: the kernel's Documentation/virt/kvm/api.rst, which gives every
ioctl a ":Type:" (system, vm, vcpu, device ioctl) and a ":Capability:". Debian ships it in
linux-doc-<version>, fetched with apt-get at test time and cached.

Consistent means: where our fd is stated, every kind in it is one api.rst's Type names
(api.rst may name more: the header saying "vm" for a vm-and-vcpu ioctl is true, if
partial); where our capability is stated, every KVM_CAP_* in it is one api.rst's
Capability names (api.rst's "basic" names none). Where api.rst has no Type or Capability
for an ioctl, there is nothing to compare.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from codegen import comments, conformance, pipeline
from codegen.arches import get_arch

from .conftest import REQUIRE_TOOLS, ROOT, need

CACHE = Path(os.environ.get("KVM_BINDINGS_DOC_CACHE",
                            Path.home() / ".cache" / "kvm-bindings" / "docs"))

# api.rst itself is wrong here, not the header: the kernel handles both in
# kvm_arch_vcpu_ioctl (arch/x86/kvm/x86.c), and api.rst's own text calls them vcpu state.
API_RST_ERRORS = {
    "KVM_GET_DEBUGREGS": "api.rst 4.33 says vm ioctl; the kernel handles it on a vcpu fd",
    "KVM_SET_DEBUGREGS": "api.rst 4.34 says vm ioctl; the kernel handles it on a vcpu fd",
}


# ---- the oracle ---------------------------------------------------------------------

def _fetch_api_rst(version: str) -> str:
    """Documentation/virt/kvm/api.rst from Debian's linux-doc-<version>, cached in CACHE."""
    package = f"linux-doc-{version}"
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"api-{version}.rst"
    if out.exists():
        return out.read_text()
    debs = sorted(CACHE.glob(f"{package}_*.deb"))
    if not debs:
        need(shutil.which("apt-get") is not None, "apt-get is not available to fetch api.rst",
             REQUIRE_TOOLS)
        r = subprocess.run(["apt-get", "download", package], cwd=CACHE,
                           capture_output=True, text=True)
        need(r.returncode == 0, f"apt-get download {package} failed (apt-get update first?): "
             f"{r.stderr.strip()}", REQUIRE_TOOLS)
        debs = sorted(CACHE.glob(f"{package}_*.deb"))
        assert debs, f"apt-get download {package} left no .deb in {CACHE}"
    need(shutil.which("dpkg-deb") is not None, "dpkg-deb is not available", REQUIRE_TOOLS)
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], check=True,
                         capture_output=True).stdout
    member = f"./usr/share/doc/{package}/Documentation/virt/kvm/api.rst.gz"
    gz = subprocess.run(["tar", "-xO", member], input=tar, check=True,
                        capture_output=True).stdout
    text = gzip.decompress(gz).decode()
    out.with_suffix(".tmp").write_text(text)
    os.replace(out.with_suffix(".tmp"), out)
    return text


def parse_api_rst(text: str) -> dict[str, dict[str, set[str] | bool]]:
    """{"KVM_RUN": {"kinds": {"vcpu"}, "caps": set(), "has_type": True, "has_cap": True}}
    from api.rst's chapter 4 sections ("4.NN KVM_A, KVM_B" over a dashed underline, then
    ":Field: value" lines; one section may hold several field blocks, as KVM_ENABLE_CAP's
    vcpu and vm forms do). KVM_(UN)REGISTER_X names both."""
    out: dict[str, dict[str, set[str] | bool]] = {}
    lines = text.split("\n")
    for k, line in enumerate(lines[:-1]):
        m = re.match(r"^4\.\d+ (.*)$", line)
        if not m or not re.match(r"^-{3,}\s*$", lines[k + 1]):
            continue
        names: set[str] = set()
        for tok in re.findall(r"KVM_\w*(?:\(UN\)\w+)?", m.group(1)):
            names |= {tok.replace("(UN)", ""), tok.replace("(UN)", "UN")}
        fields: dict[str, str] = {}
        last = None
        for body in lines[k + 2:]:
            f = re.match(r"^:([\w ]+):\s*(.*)$", body)
            if f:
                last = f.group(1)
                fields[last] = fields.get(last, "") + " " + f.group(2)
            elif body[:1] in (" ", "\t") and body.strip() and last:
                fields[last] += " " + body.strip()         # a field's continuation line
            elif body.strip():
                break
            else:
                last = None
        kinds = set(re.findall(r"\b(system|vm|vcpu|device)\b", fields.get("Type", "").lower()))
        caps = set(re.findall(r"\bKVM_CAP_\w+", fields.get("Capability", "")))
        for name in names:
            e = out.setdefault(name, {"kinds": set(), "caps": set(), "has_type": False,
                                      "has_cap": False})
            e["kinds"] |= kinds                                   # type: ignore[operator]
            e["caps"] |= caps                                     # type: ignore[operator]
            e["has_type"] = bool(e["has_type"]) or "Type" in fields
            e["has_cap"] = bool(e["has_cap"]) or "Capability" in fields
    return out


def disagreements(ioctls: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...] | None]],
                  api: dict[str, dict[str, set[str] | bool]]) -> list[str]:
    """Every stated fd or capability api.rst contradicts: {name: (fd, capability)}."""
    out = []
    for name, (fd, cap) in sorted(ioctls.items()):
        doc = api.get(name)
        if doc is None or name in API_RST_ERRORS:
            continue
        kinds, caps = doc["kinds"], doc["caps"]
        assert isinstance(kinds, set) and isinstance(caps, set)
        if fd is not None and doc["has_type"] and not set(fd) <= kinds:
            out.append(f"{name}: fd {fd}, api.rst Type {sorted(kinds)}")
        if cap is not None and doc["has_cap"] and not set(cap) <= caps:
            out.append(f"{name}: capability {cap}, api.rst Capability {sorted(caps) or 'basic'}")
    return out


@pytest.fixture(scope="session")
def api_rst():
    cache: dict[str, dict[str, dict[str, set[str] | bool]]] = {}

    def get(version: str) -> dict[str, dict[str, set[str] | bool]]:
        if version not in cache:
            cache[version] = parse_api_rst(_fetch_api_rst(version))
        return cache[version]
    return get


def _table(mod) -> dict[str, tuple[tuple[str, ...] | None, tuple[str, ...] | None]]:
    return {name: (io.fd, io.capability) for name, io in mod.IOCTLS.items()}


@pytest.fixture(scope="session")
def module_6_1(header_set):
    arch = get_arch("x86_64")
    files = pipeline.generate(header_set("6.1.4", "x86_64"), arch, with_facts=False)
    return conformance.load_generated(files, arch)


# ---- the comparisons -----------------------------------------------------------------

def test_6_1_module_agrees_with_the_6_1_api_rst(module_6_1, api_rst):
    api = api_rst("6.1")
    both = set(module_6_1.IOCTLS) & set(api)
    assert len(both) > 100, f"only {len(both)} ioctls in both: is api.rst parsed?"
    problems = disagreements(_table(module_6_1), api)
    assert not problems, "api.rst 6.1 contradicts the 6.1.4 module:\n" + "\n".join(problems)


def test_shipped_module_agrees_with_the_6_12_api_rst(api_rst):
    from kvm_bindings.abi import x86_64
    api = api_rst("6.12")
    both = set(x86_64.IOCTLS) & set(api)
    assert len(both) > 100, f"only {len(both)} ioctls in both: is api.rst parsed?"
    problems = disagreements(_table(x86_64), api)
    assert not problems, ("api.rst 6.12 contradicts the shipped 7.2.0 module:\n"
                          + "\n".join(problems))


def test_shipped_module_states_most_fds():
    from kvm_bindings.abi import x86_64
    stated = [io for io in x86_64.IOCTLS.values() if io.fd is not None]
    assert {k for io in stated for k in io.fd} == set(comments.FD_KINDS)
    assert x86_64.IOCTLS["KVM_RUN"].fd == ("vcpu",)
    assert x86_64.IOCTLS["KVM_CHECK_EXTENSION"].fd == ("system",)
    assert x86_64.IOCTLS["KVM_CREATE_DEVICE"].fd == ("vm",)
    assert x86_64.IOCTLS["KVM_SET_DEVICE_ATTR"].fd == ("device",)
    # 7.2.0 dropped the "ioctls for VM fds" comment: the header no longer says
    assert x86_64.IOCTLS["KVM_CREATE_VCPU"].fd is None
    assert x86_64.IOCTLS["KVM_GET_PIT2"].capability == ("KVM_CAP_PIT_STATE2",)


def test_every_contradicted_entry_is_contradicted_and_none_is_missing(api_rst):
    """CONTRADICTED retracts only what api.rst really contradicts, and all of it: derived
    without it, every version's header disagrees with api.rst exactly there."""
    pairs = [("4.19.26", "6.1"), ("5.16.2", "6.1"), ("6.1.4", "6.1"), ("6.3.8", "6.12"),
             ("6.13.4", "6.12"), ("6.19.0", "6.12"), ("7.2.0", "6.12")]
    seen: set[tuple[str, str]] = set()
    unlisted = []
    for version, doc in pairs:
        text = (ROOT / "headers" / version / "common" / "linux" / "kvm.h")
        need(text.exists(), f"headers/{version} is not fetched", REQUIRE_TOOLS)
        raw = comments.ioctl_notes(text.read_text(errors="replace"), contradicted={})
        table = {n: (v["fd"], v["capability"]) for n, v in raw.items()}
        for problem in disagreements(table, api_rst(doc)):  # type: ignore[arg-type]
            name, what = problem.split(": ")[0], problem.split(": ")[1].split()[0]
            seen.add((name, what))
            if (name, what) not in comments.CONTRADICTED:
                unlisted.append(f"{version}: {problem}")
    assert not unlisted, "api.rst contradicts these and CONTRADICTED lacks them:\n" + \
        "\n".join(unlisted)
    stale = set(comments.CONTRADICTED) - seen
    assert not stale, f"CONTRADICTED entries api.rst does not contradict: {sorted(stale)}"


def test_the_comparison_catches_a_flipped_fd_and_a_wrong_capability(api_rst):
    from kvm_bindings.abi import x86_64
    table = _table(x86_64)
    table["KVM_RUN"] = (("vm",), None)
    table["KVM_GET_PIT2"] = (("vm",), ("KVM_CAP_IRQCHIP",))
    problems = "\n".join(disagreements(table, api_rst("6.12")))
    assert "KVM_RUN: fd ('vm',)" in problems
    assert "KVM_GET_PIT2: capability ('KVM_CAP_IRQCHIP',)" in problems


# ---- each comment shape, on small headers ----------------------------------------------

def _notes(text: str, **kw):
    return comments.ioctl_notes(text, **kw)


def test_a_section_comment_reaches_past_structs_and_comments_to_the_next_section():
    text = """/*
 * ioctls for VM fds
 */
#define KVM_A _IO(KVMIO, 0x40)

struct s { int x; };
/* Device model IOC */
#define KVM_B _IO(KVMIO, 0x41)
/* ioctls for fds returned by KVM_CREATE_DEVICE */
#define KVM_C _IO(KVMIO, 0xe1)
/*
 * ioctls for vcpu fds
 */
#define KVM_D _IO(KVMIO, 0x80)
"""
    n = _notes(text)
    assert [n[k]["fd"] for k in "KVM_A KVM_B KVM_C KVM_D".split()] == \
        [("vm",), ("vm",), ("device",), ("vcpu",)]


def test_a_paragraph_of_other_defines_ends_a_section_but_flags_beside_an_ioctl_do_not():
    text = """/*
 * ioctls for /dev/kvm fds:
 */
#define KVM_A _IO(KVMIO, 0x00) /* returns a VM fd */
#define KVM_FLAG_X 1
#define KVM_B _IO(KVMIO, 0x01)

#define KVM_CAP_Y 2
#define KVM_CAP_Z 3

#define KVM_C _IO(KVMIO, 0x41)
"""
    n = _notes(text)
    assert n["KVM_A"]["fd"] == ("system",) and n["KVM_B"]["fd"] == ("system",)
    assert n["KVM_C"]["fd"] is None
    assert "no section" in str(n["KVM_C"]["fd_from"])


def test_per_define_comment_shapes_name_their_fds():
    shapes = {
        "/* ioctl for vm fd */": ("vm",),
        "/* vcpu ioctl */": ("vcpu",),
        "/* Per-VM Xen attributes */": ("vm",),
        "/* Per-vCPU Xen attributes */": ("vcpu",),
        "/* valid for virtual machine (for floating interrupt)_and_ vcpu */": ("vm", "vcpu"),
        "/*\n * vcpu version available with KVM_CAP_P\n * vm version available with KVM_CAP_Q\n */":
            ("vm", "vcpu"),
        "/* Available with KVM_CAP_P for a vCPU, or with\n*  KVM_CAP_Q to set defaults for a VM */":
            ("vm", "vcpu"),
        "/* Available with KVM_CAP_P (vcpu) / KVM_CAP_Q (system) */": ("system", "vcpu"),
        "/* VM is being stopped by host */": None,
        "/* MCE for x86 */": None,
    }
    for comment, fd in shapes.items():
        text = f"#define KVM_CAP_P 1\n#define KVM_CAP_Q 2\n\n{comment}\n#define KVM_X _IO(KVMIO, 1)\n"
        assert _notes(text)["KVM_X"]["fd"] == fd, comment


def test_a_comment_overrides_its_section():
    text = ("/*\n * ioctls for vcpu fds\n */\n#define KVM_RUN _IO(KVMIO, 0x80)\n"
            "/* valid for virtual machine _and_ vcpu */\n#define KVM_I _IO(KVMIO, 0x94)\n"
            "#define KVM_OTHER_ONE _IO(KVMIO, 0x95)\n")
    n = _notes(text)
    assert n["KVM_I"]["fd"] == ("vm", "vcpu")
    assert n["KVM_OTHER_ONE"]["fd"] == ("vcpu",)  # not KVM_I's sibling: back to the section


def test_available_with_reaches_the_define_below_and_its_siblings_only():
    text = """#define KVM_CAP_PIT_STATE2 35
#define KVM_CAP_PMU_EVENT_FILTER 173
#define KVM_CAP_XSAVE 55

/* Available with KVM_CAP_PIT_STATE2 */
#define KVM_GET_PIT2 _IOR(KVMIO, 0x9f, int)
#define KVM_SET_PIT2 _IOW(KVMIO, 0xa0, int)
/* Available with KVM_CAP_PMU_EVENT_FILTER */
#define KVM_SET_PMU_EVENT_FILTER _IOW(KVMIO, 0xb2, int)
#define KVM_PPC_SVM_OFF _IO(KVMIO, 0xb3)
/* Available with KVM_CAP_XSAVE */

#define KVM_GET_XSAVE _IOR(KVMIO, 0xa4, int)
"""
    n = _notes(text)
    assert n["KVM_GET_PIT2"]["capability"] == n["KVM_SET_PIT2"]["capability"] == \
        ("KVM_CAP_PIT_STATE2",)
    assert n["KVM_SET_PMU_EVENT_FILTER"]["capability"] == ("KVM_CAP_PMU_EVENT_FILTER",)
    assert n["KVM_PPC_SVM_OFF"]["capability"] is None       # appended below, another name
    assert n["KVM_GET_XSAVE"]["capability"] is None         # a blank line between


def test_gating_words_and_caps_the_header_does_not_define():
    text = """#define KVM_CAP_A 1
#define KVM_CAP_B 2

/* Requires KVM_CAP_A */
#define KVM_X _IO(KVMIO, 1)
/* For KVM_CAP_A */
#define KVM_Y _IO(KVMIO, 2)
/* Available with KVM_CAP_A or KVM_CAP_MISSPELT */
#define KVM_Z _IO(KVMIO, 3)
/* Available with KVM_CAP_MISSPELT */
#define KVM_W _IO(KVMIO, 4)
"""
    n = _notes(text)
    assert n["KVM_X"]["capability"] == ("KVM_CAP_A",)
    assert n["KVM_Y"]["capability"] is None               # "for" does not say it gates
    assert n["KVM_Z"]["capability"] == ("KVM_CAP_A",)
    assert n["KVM_W"]["capability"] is None


def test_a_contradicted_section_leaves_the_fd_unstated_and_says_why():
    text = "/*\n * ioctls for vcpu fds\n */\n#define KVM_RUN _IO(KVMIO, 0x80)\n" \
           "#define KVM_VMISH _IO(KVMIO, 0x81)\n"
    n = _notes(text, contradicted={("KVM_VMISH", "fd"): "a VM ioctl"})
    assert n["KVM_RUN"]["fd"] == ("vcpu",)
    assert n["KVM_VMISH"]["fd"] is None
    assert "contradicts api.rst, a VM ioctl" in str(n["KVM_VMISH"]["fd_from"])


def test_ioctls_outside_kvm_h_are_unstated():
    from kvm_bindings.abi import x86_64
    for io in x86_64.IOCTLS.values():
        if io.fd is not None:
            assert set(io.fd) <= set(comments.FD_KINDS), io
        if io.capability is not None:
            assert all(hasattr(x86_64, c) for c in io.capability), io
