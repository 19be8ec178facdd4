"""Facts the headers state only in comments.

struct kvm_run marks each member of its exit union with the exit reasons that
use it ("/* KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR */" before "msr"). The
preprocessor drops comments, so this reads the header text itself.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"/\*.*?\*/|//[^\n]*|^[ \t]*#[^\n]*|[{};]|[A-Za-z_]\w*|\S", re.S | re.M)


def exit_members(header_text: str) -> dict[str, tuple[str, int]]:
    """{"KVM_EXIT_IO": ("io", line), ...}: the kvm_run union member each exit reason
    fills, and the line of the comment that says so."""
    m = re.search(r"^struct kvm_run \{", header_text, re.M)
    if not m:
        return {}
    depth, union_depth = 0, None
    pending: list[str] = []
    pending_line = 0
    last_id = None
    out: dict[str, tuple[str, int]] = {}
    for tok in _TOKEN.finditer(header_text, m.end() - 1):
        t = tok.group()
        if t.startswith("/*") or t.startswith("//"):
            names = re.findall(r"\bKVM_EXIT_\w+", t)
            if names and (union_depth is None or depth == union_depth):
                union_depth = depth
                pending = [n for n in names if n not in out]
                pending_line = header_text.count("\n", 0, tok.start()) + 1
            continue
        if t.lstrip().startswith("#"):
            continue
        if t == "{":
            depth += 1
        elif t == "}":
            depth -= 1
            if depth == 0:
                break
        elif t == ";" and depth == union_depth:
            if pending and last_id:
                for n in pending:
                    out[n] = (last_id, pending_line)
            pending = []
        elif re.match(r"[A-Za-z_]", t):
            last_id = t
    return out


# ---- which fd an ioctl is issued on, and the capability that gates it ----------------
#
# kvm.h groups its ioctl #defines under section comments ("ioctls for /dev/kvm fds",
# "ioctls for VM fds", "ioctl for vm fd", "ioctls for fds returned by KVM_CREATE_DEVICE",
# "ioctls for vcpu fds") and puts short comments above some of them ("Available with
# KVM_CAP_X", "Per-VM Xen attributes", "vcpu version available with ...").
#
# Reach of a section comment: every ioctl define below it, up to the next section comment
# or the first paragraph (lines between blank lines) that #defines something other than an
# ioctl and no ioctl (the capability list, a block of flag values), whichever comes first.
# Structs, other comments, blank lines, and flag values defined in the same paragraph as
# an ioctl (KVM_S390_STORE_STATUS_NOADDR above KVM_S390_STORE_STATUS) do not end it.
#
# Reach of a short comment (one that is not a section comment and does not trail code on
# its line): the ioctl define right below it, and then each following define that is a
# sibling of that first one (the same name but for one word: GET/SET, NORMAL/CLEAR), with
# no blank line, comment or other line between. The header appends new ioctls under old
# comments (KVM_PPC_SVM_OFF below "Available with KVM_CAP_PMU_EVENT_FILTER" and its
# define), so a define of another name is not taken to be covered.
#
# A short comment's fd words (see _FD_SHAPES) override the section. A capability is read
# only from a short comment that says "available with", "requires" or "needs": every
# KVM_CAP_* it names, in order (several where it names one per fd kind or alternatives).

FD_KINDS = ("system", "vm", "vcpu", "device")

_KIND = r"(/dev/kvm|system|virtual machine|vm|vcpu)"
_FD_SHAPES = [re.compile(p, re.I) for p in (
    r"\bioctls? for " + _KIND + r"\b",           # ioctl for vm fd
    r"\b" + _KIND + r" ioctls?\b",                 # vcpu ioctl
    r"\bper-" + _KIND + r"\b",                     # Per-VM Xen attributes
    r"\b" + _KIND + r" version\b",                 # vcpu version available with ...
    r"\bfor an? " + _KIND + r"\b",                 # ... for a vCPU, or ... for a VM
    r"\(" + _KIND + r"\)",                         # KVM_CAP_X (vcpu) / KVM_CAP_Y (system)
    r"\bvalid for " + _KIND + r"\b",               # valid for virtual machine ...
    r"\b_and_ " + _KIND + r"\b",                   # ... _and_ vcpu
)]
_SECTION = re.compile(r"^ioctls? for (/dev/kvm|vm|vcpu) fds?:?$|"
                      r"^ioctls? for fds returned by KVM_CREATE_DEVICE:?$", re.I)
_GATE = re.compile(r"\b(available with|requires|needs)\b", re.I)
_IOCTL_BODY = re.compile(r"\b_IO[RW]{0,2}\s*\(|\b__KVM_DEPRECATED_\w+")
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)(?!\()(.*)$")

# Where the header's grouping or a comment's reach contradicts how the kernel issues or
# gates an ioctl (api.rst documents each one's type and capability), the header is not
# taken as saying anything: that field is unstated (None) for these defines, never the
# header's wrong value. tests/test_ioctl_fds.py checks every entry against api.rst, and
# that api.rst contradicts no derived value missing here.
CONTRADICTED = {
    # under "ioctls for VM fds" (until 6.1), issued on a vcpu fd
    ("KVM_S390_UCAS_MAP", "fd"): "a vcpu ioctl grouped with the VM ioctls",
    ("KVM_S390_UCAS_UNMAP", "fd"): "a vcpu ioctl grouped with the VM ioctls",
    ("KVM_S390_VCPU_FAULT", "fd"): "a vcpu ioctl grouped with the VM ioctls",
    # under "ioctls for vcpu fds", issued on a VM or the system fd
    ("KVM_X86_GET_MCE_CAP_SUPPORTED", "fd"): "a system ioctl grouped with the vcpu ioctls",
    ("KVM_ARM_PREFERRED_TARGET", "fd"): "a VM ioctl grouped with the vcpu ioctls",
    ("KVM_S390_GET_SKEYS", "fd"): "a VM ioctl grouped with the vcpu ioctls",
    ("KVM_S390_SET_SKEYS", "fd"): "a VM ioctl grouped with the vcpu ioctls",
    ("KVM_S390_GET_CMMA_BITS", "fd"): "a VM ioctl grouped with the vcpu ioctls",
    ("KVM_S390_SET_CMMA_BITS", "fd"): "a VM ioctl grouped with the vcpu ioctls",
    ("KVM_MEMORY_ENCRYPT_OP", "fd"): "a VM ioctl grouped with the vcpu ioctls",
    ("KVM_MEMORY_ENCRYPT_REG_REGION", "fd"): "not a vcpu ioctl (api.rst: system)",
    ("KVM_MEMORY_ENCRYPT_UNREG_REGION", "fd"): "not a vcpu ioctl (api.rst: system)",
    ("KVM_HYPERV_EVENTFD", "fd"): "a VM ioctl grouped with the vcpu ioctls",
    ("KVM_CLEAR_DIRTY_LOG", "fd"): "a VM ioctl grouped with the vcpu ioctls",
    ("KVM_S390_PV_COMMAND", "fd"): "a VM ioctl grouped with the vcpu ioctls",
    ("KVM_X86_SET_MSR_FILTER", "fd"): "a VM ioctl grouped with the vcpu ioctls",
    ("KVM_XEN_HVM_EVTCHN_SEND", "fd"): "a VM ioctl grouped with the vcpu ioctls",
    # the comment above KVM_SET_TSC_KHZ reaches its sibling, which another cap gates
    ("KVM_GET_TSC_KHZ", "capability"): "gated by KVM_CAP_GET_TSC_KHZ, which the comment "
                                       "written for KVM_SET_TSC_KHZ does not name",
}


def _kinds(text: str) -> tuple[str, ...]:
    found = set()
    for shape in _FD_SHAPES:
        for m in shape.finditer(text):
            word = m.group(1).lower()
            found.add({"/dev/kvm": "system", "virtual machine": "vm"}.get(word, word))
    return tuple(k for k in FD_KINDS if k in found)


def _section_kinds(text: str) -> tuple[str, ...] | None:
    m = _SECTION.match(text)
    if not m:
        return None
    if m.group(1) is None:
        return ("device",)
    return _kinds(f"ioctl for {m.group(1)}")


def _siblings(a: str, b: str) -> bool:
    x, y = a.split("_"), b.split("_")
    return len(x) == len(y) and sum(p != q for p, q in zip(x, y)) == 1


def _comment_text(raw: str) -> str:
    body = raw[2:-2] if raw.startswith("/*") else raw[2:]
    lines = [ln.strip().lstrip("*").strip() for ln in body.splitlines()]
    return " ".join(ln for ln in lines if ln)


def _define_at(lines: list[str], k: int) -> tuple[str, bool, int] | None:
    """(name, whether it is an ioctl, its last line's index) for a #define on line k."""
    m = _DEFINE.match(lines[k])
    if not m:
        return None
    body, j = m.group(2), k
    while lines[j].rstrip().endswith("\\") and j + 1 < len(lines):
        j += 1
        body += " " + lines[j]
    body = re.sub(r"/\*.*?\*/|//.*", "", body, flags=re.S)
    return m.group(1), bool(_IOCTL_BODY.search(body)), j


def ioctl_notes(header_text: str, contradicted: dict[tuple[str, str], str] | None = None
                ) -> dict[str, dict[str, object]]:
    """{"KVM_RUN": {"fd": ("vcpu",), "fd_from": "section ...", "capability": None,
    "line": 1345}, ...} for every ioctl #define in the text (a define whose value calls
    _IO/_IOR/_IOW/_IOWR). fd is None where the header says nothing decisive; fd_from says
    which comment it came from, or why there is none. A capability the header does not
    #define (a misspelt one: KVM_CAP_RMA for KVM_CAP_PPC_RMA) is left out. contradicted
    defaults to CONTRADICTED."""
    contradicted = CONTRADICTED if contradicted is None else contradicted
    defined_caps = set(re.findall(r"^[ \t]*#[ \t]*define[ \t]+(KVM_CAP_\w+)", header_text, re.M))
    lines = header_text.split("\n")
    paragraph: list[int] = []           # each line's paragraph (runs of non-blank lines)
    for ln in lines:
        paragraph.append((paragraph[-1] if paragraph else 0) + (not ln.strip()))
    has_ioctl = set()
    for k in range(len(lines)):
        d = _define_at(lines, k)
        if d and d[1]:
            has_ioctl.add(paragraph[k])

    out: dict[str, dict[str, object]] = {}
    section: tuple[tuple[str, ...], str, int] | None = None
    note: tuple[str, int] | None = None       # the short comment above, and its line
    run_first: str | None = None              # the first define below that comment
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("/*") or stripped.startswith("//"):
            j, raw, rest = i, stripped, ""
            if stripped.startswith("/*"):
                while "*/" not in (stripped[2:] if j == i else lines[j]) and j + 1 < len(lines):
                    j += 1
                raw = "\n".join([stripped] + lines[i + 1:j + 1])
                raw, rest = raw[:raw.find("*/", 2) + 2], raw[raw.find("*/", 2) + 2:].strip()
            text = _comment_text(raw)
            kinds = _section_kinds(text)
            if kinds is not None:
                section, note = (kinds, text, i + 1), None
            else:
                note = (text, i + 1)
            run_first = None
            if rest:            # code after the comment on its line: read it as a line
                lines[j] = rest
                i = j
            else:
                i = j + 1
            continue
        d = _define_at(lines, i)
        if d is None:
            # a blank line or any other code ends a short comment's reach
            note, run_first = None, None
            i += 1
            continue
        name, is_ioctl, last = d
        if not is_ioctl:
            if paragraph[i] not in has_ioctl:
                section = None
            note, run_first = None, None
            i = last + 1
            continue
        if note is not None and run_first is not None and not _siblings(run_first, name):
            note = None
        if note is not None and run_first is None:
            run_first = name
        fd: tuple[str, ...] | None = None
        fd_from = "no section or comment in the header says which fd"
        cap = None
        if section is not None:
            fd, fd_from = section[0], f"section \"{section[1]}\" (line {section[2]})"
        if note is not None:
            kinds = _kinds(note[0])
            if kinds:
                fd, fd_from = kinds, f"comment \"{note[0]}\" (line {note[1]})"
            if _GATE.search(note[0]):
                cap = tuple(c for c in re.findall(r"\bKVM_CAP_\w+", note[0])
                            if c in defined_caps) or None
        if fd is not None and (name, "fd") in contradicted:
            fd, fd_from = None, (f"unstated: {fd_from} contradicts api.rst, "
                                 f"{contradicted[name, 'fd']}")
        if (name, "capability") in contradicted:
            cap = None
        out[name] = {"fd": fd, "fd_from": fd_from, "capability": cap, "line": i + 1}
        i = last + 1
    return out
