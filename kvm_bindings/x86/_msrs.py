"""kvm_msrs requests, which two x86 fds take: KVM_GET_MSRS on /dev/kvm (feature MSRs) and
KVM_GET_MSRS / KVM_SET_MSRS on vCPUs."""

from __future__ import annotations

from collections.abc import Iterable

from .._layout import fill
from ..abi import x86_64 as abi


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
