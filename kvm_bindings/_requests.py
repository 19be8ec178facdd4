"""Request structs more than one kind of fd takes: kvm_enable_cap (KVM_ENABLE_CAP on VMs
and vCPUs)."""

from __future__ import annotations

from . import abi
from ._layout import check_field, fill


def enable_cap(cap: int, args: tuple[int, ...], flags: int) -> abi.kvm_enable_cap:
    """A kvm_enable_cap with up to four arguments, each checked against its C type."""
    if len(args) > 4:
        raise ValueError("KVM_ENABLE_CAP takes at most four arguments")
    req = fill(abi.kvm_enable_cap, cap=cap, flags=flags)
    for i, a in enumerate(args):
        req.args[i] = check_field(a, abi.kvm_enable_cap, "args", f"args[{i}]", index=i)
    return req
