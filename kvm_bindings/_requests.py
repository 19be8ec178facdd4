"""Request structs more than one kind of fd takes: kvm_msrs (KVM_GET_MSRS on /dev/kvm for
feature MSRs, and on vCPUs) and kvm_enable_cap (KVM_ENABLE_CAP on VMs and vCPUs)."""

from __future__ import annotations

from collections.abc import Iterable

from . import abi
from ._layout import check_field, fill


def msrs(indices: Iterable[int], values: Iterable[int] | None = None) -> abi.kvm_msrs:
    """A kvm_msrs with one entry per index (and value), each checked against its C type."""
    indices = list(indices)
    msrs = abi.kvm_msrs.alloc(len(indices))
    entries = msrs.flex_array()
    if values is None:
        for entry, index in zip(entries, indices):
            fill(entry, {"index": "MSR index"}, index=index)
    else:
        for entry, index, value in zip(entries, indices, values):
            fill(entry, {"index": "MSR index", "data": f"the value of MSR {index:#x}"},
                 index=index, data=value)
    return msrs


def msr_results(msrs: abi.kvm_msrs, done: int) -> dict[int, int]:
    """{index: value} for the first `done` entries, the ones KVM_GET_MSRS filled in."""
    return {int(e.index): int(e.data) for e in msrs.flex_array()[:done]}


def enable_cap(cap: int, args: tuple[int, ...], flags: int) -> abi.kvm_enable_cap:
    """A kvm_enable_cap with up to four arguments, each checked against its C type."""
    if len(args) > 4:
        raise ValueError("KVM_ENABLE_CAP takes at most four arguments")
    req = fill(abi.kvm_enable_cap, cap=cap, flags=flags)
    for i, a in enumerate(args):
        req.args[i] = check_field(a, abi.kvm_enable_cap, "args", f"args[{i}]", index=i)
    return req
