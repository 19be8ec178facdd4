"""Every call the arch-neutral runtime makes to KVM, declared once: the fd it goes to, the
method users call, the ioctls it issues and the capability it checks first.

Each arch package declares its own calls the same way (kvm_bindings.x86._calls, ...).
`python -m kvm_bindings info` reads these tables to say which calls this host supports,
`python -m kvm_bindings calls --markdown` renders README's list from them, and
tests/test_api_completeness.py holds every row to the method's code and every KVM ioctl of
the generated layer to some row. A method is listed if it issues an ioctl itself or
through a private helper; methods built only on other listed ones (set_single_step,
get_registers, enable_dirty_ring) are not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

__all__ = ["CALLS", "FDS", "Call", "by_fd", "markdown"]

#: The fd kinds, in the order the kernel makes them, with the name their methods are called on.
FDS: dict[str, str] = {"system": "kvm", "vm": "vm", "vcpu": "vcpu", "device": "device"}


class Call(NamedTuple):
    """One public method that issues KVM ioctls."""

    fd: str                      # "system", "vm", "vcpu" or "device": where the ioctls go
    method: str                  # as users call it: "vm.create_irqchip", "Kvm()", "Kvm.from_fd"
    ioctls: tuple[str, ...]      # the KVM_* ioctls it issues
    capability: str | None       # the KVM_CAP_* it requires first; None: the base API

    @property
    def attribute(self) -> str:
        """The class attribute that implements it ("__init__" for a constructor)."""
        if self.method.endswith("()"):
            return "__init__"
        return self.method.partition(".")[2]


_REGION = ("KVM_SET_USER_MEMORY_REGION", "KVM_SET_USER_MEMORY_REGION2")

CALLS: tuple[Call, ...] = (
    Call("system", "Kvm()", ("KVM_GET_API_VERSION",), None),
    Call("system", "Kvm.from_fd", ("KVM_GET_API_VERSION",), None),
    Call("system", "kvm.check_extension", ("KVM_CHECK_EXTENSION",), None),
    Call("system", "kvm.get_vcpu_mmap_size", ("KVM_GET_VCPU_MMAP_SIZE",), None),
    Call("system", "kvm.create_vm", ("KVM_CREATE_VM",), None),

    Call("vm", "vm.check_extension", ("KVM_CHECK_EXTENSION",), None),
    Call("vm", "vm.enable_cap", ("KVM_ENABLE_CAP",), "KVM_CAP_ENABLE_CAP_VM"),
    Call("vm", "vm.create_vcpu", ("KVM_CREATE_VCPU",), None),
    Call("vm", "vm.add_memory", _REGION, None),
    Call("vm", "vm.remove_memory", ("KVM_SET_USER_MEMORY_REGION",), None),
    Call("vm", "vm.move_memory", _REGION, None),
    Call("vm", "vm.set_readonly", _REGION, None),
    Call("vm", "vm.set_dirty_logging", _REGION, None),
    Call("vm", "vm.get_dirty_log", ("KVM_GET_DIRTY_LOG",), None),
    Call("vm", "vm.clear_dirty_log", ("KVM_CLEAR_DIRTY_LOG",), "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"),
    Call("vm", "vm.create_guest_memfd", ("KVM_CREATE_GUEST_MEMFD",), "KVM_CAP_GUEST_MEMFD"),
    Call("vm", "vm.set_memory_attributes", ("KVM_SET_MEMORY_ATTRIBUTES",),
         "KVM_CAP_MEMORY_ATTRIBUTES"),
    Call("vm", "vm.set_irq_line", ("KVM_IRQ_LINE", "KVM_IRQ_LINE_STATUS"), None),
    Call("vm", "vm.signal_msi", ("KVM_SIGNAL_MSI",), "KVM_CAP_SIGNAL_MSI"),
    Call("vm", "vm.set_gsi_routing", ("KVM_SET_GSI_ROUTING",), "KVM_CAP_IRQ_ROUTING"),
    Call("vm", "vm.add_irqfd", ("KVM_IRQFD",), "KVM_CAP_IRQFD"),
    Call("vm", "vm.remove_irqfd", ("KVM_IRQFD",), None),
    Call("vm", "vm.add_ioeventfd", ("KVM_IOEVENTFD",), "KVM_CAP_IOEVENTFD"),
    Call("vm", "vm.remove_ioeventfd", ("KVM_IOEVENTFD",), "KVM_CAP_IOEVENTFD"),
    Call("vm", "vm.add_coalesced_mmio", ("KVM_REGISTER_COALESCED_MMIO",), "KVM_CAP_COALESCED_MMIO"),
    Call("vm", "vm.remove_coalesced_mmio", ("KVM_UNREGISTER_COALESCED_MMIO",), None),
    Call("vm", "vm.reset_dirty_rings", ("KVM_RESET_DIRTY_RINGS",), None),
    Call("vm", "vm.has_device_type", ("KVM_CREATE_DEVICE",), "KVM_CAP_DEVICE_CTRL"),
    Call("vm", "vm.create_device", ("KVM_CREATE_DEVICE",), "KVM_CAP_DEVICE_CTRL"),
    Call("vm", "vm.open_stats", ("KVM_GET_STATS_FD",), "KVM_CAP_BINARY_STATS_FD"),
    Call("vm", "vm.has_attr", ("KVM_HAS_DEVICE_ATTR",), None),
    Call("vm", "vm.get_attr", ("KVM_GET_DEVICE_ATTR",), None),
    Call("vm", "vm.set_attr", ("KVM_SET_DEVICE_ATTR",), None),

    Call("vcpu", "vcpu.run", ("KVM_RUN",), None),
    Call("vcpu", "vcpu.get_mp_state", ("KVM_GET_MP_STATE",), "KVM_CAP_MP_STATE"),
    Call("vcpu", "vcpu.set_mp_state", ("KVM_SET_MP_STATE",), "KVM_CAP_MP_STATE"),
    Call("vcpu", "vcpu.set_guest_debug", ("KVM_SET_GUEST_DEBUG",), "KVM_CAP_SET_GUEST_DEBUG"),
    Call("vcpu", "vcpu.get_one_reg", ("KVM_GET_ONE_REG",), "KVM_CAP_ONE_REG"),
    Call("vcpu", "vcpu.set_one_reg", ("KVM_SET_ONE_REG",), "KVM_CAP_ONE_REG"),
    Call("vcpu", "vcpu.get_reg_list", ("KVM_GET_REG_LIST",), None),
    Call("vcpu", "vcpu.set_signal_mask", ("KVM_SET_SIGNAL_MASK",), None),
    Call("vcpu", "vcpu.enable_cap", ("KVM_ENABLE_CAP",), "KVM_CAP_ENABLE_CAP"),
    Call("vcpu", "vcpu.open_stats", ("KVM_GET_STATS_FD",), "KVM_CAP_BINARY_STATS_FD"),
    Call("vcpu", "vcpu.has_attr", ("KVM_HAS_DEVICE_ATTR",), None),
    Call("vcpu", "vcpu.get_attr", ("KVM_GET_DEVICE_ATTR",), None),
    Call("vcpu", "vcpu.set_attr", ("KVM_SET_DEVICE_ATTR",), None),

    Call("device", "device.has_attr", ("KVM_HAS_DEVICE_ATTR",), None),
    Call("device", "device.get_attr", ("KVM_GET_DEVICE_ATTR",), None),
    Call("device", "device.set_attr", ("KVM_SET_DEVICE_ATTR",), None),
)


def by_fd(calls: Iterable[Call]) -> dict[str, list[Call]]:
    """calls grouped by fd kind, in FDS order, each group in the order given."""
    groups: dict[str, list[Call]] = {fd: [] for fd in FDS}
    for call in calls:
        groups[call.fd].append(call)
    return groups


_HEADINGS = {"system": "The system fd (`/dev/kvm`, a `Kvm`)", "vm": "A VM fd (`Vm`)",
             "vcpu": "A vCPU fd (`Vcpu`)", "device": "A device fd (`Device`)"}


def markdown(tables: Mapping[str, Sequence[Call]]) -> str:
    """The calls as README lists them: a table per fd kind, each call with its ioctls, the
    capability it needs and the arches that have it. tables: {arch: calls}, "all" for the
    arch-neutral table; a call several arches declare alike is one row naming them all."""
    arches: dict[Call, list[str]] = {}
    for arch, calls in tables.items():
        for call in calls:
            arches.setdefault(call, []).append(arch)
    out: list[str] = []
    for fd, calls in by_fd(arches).items():
        out += [f"#### {_HEADINGS[fd]}", "", "| call | ioctls | capability | arch |",
                "|---|---|---|---|"]
        for call in calls:
            ioctls = ", ".join(f"`{name}`" for name in call.ioctls)
            cap = f"`{call.capability}`" if call.capability else "—"
            out.append(f"| `{call.method}` | {ioctls} | {cap} | {', '.join(arches[call])} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"
