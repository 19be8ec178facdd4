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
