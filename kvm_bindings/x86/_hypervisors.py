"""HypervisorVm, HypervisorVcpu: KVM's emulation of other hypervisors' guest interfaces on
x86 (Xen HVM, and the Hyper-V SIGNAL_EVENT eventfd), the bases X86Vm and X86Vcpu build on.

KVM_CHECK_EXTENSION(KVM_CAP_XEN_HVM) answers a bitmask of KVM_XEN_HVM_CONFIG_* features:
each call here asks for the feature bit api.rst names for it, before any ioctl.
"""

from __future__ import annotations

from .._layout import check_field, expect, fill
from ..abi import x86_64 as abi
from ..errors import KvmUnsupported
from ..vcpu import Vcpu
from ..vm import Vm

__all__ = ["HypervisorVcpu", "HypervisorVm"]

# The KVM_XEN_HVM_CONFIG_* feature bits by name, for messages; declared, not found by prefix.
_XEN_FEATURES = {getattr(abi, name): name for name in (
    "KVM_XEN_HVM_CONFIG_HYPERCALL_MSR", "KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL",
    "KVM_XEN_HVM_CONFIG_SHARED_INFO", "KVM_XEN_HVM_CONFIG_RUNSTATE",
    "KVM_XEN_HVM_CONFIG_EVTCHN_2LEVEL", "KVM_XEN_HVM_CONFIG_EVTCHN_SEND",
    "KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG", "KVM_XEN_HVM_CONFIG_PVCLOCK_TSC_UNSTABLE",
    "KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA")}

# Which feature each attribute type needs (the uapi header's "Available with" notes, and
# api.rst for the runstate attributes); a type not listed needs SHARED_INFO, as the
# attribute ioctls themselves do, and the kernel judges it.
_HVM_ATTR_FEATURE = {
    abi.KVM_XEN_ATTR_TYPE_EVTCHN: abi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND,
    abi.KVM_XEN_ATTR_TYPE_XEN_VERSION: abi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND,
    abi.KVM_XEN_ATTR_TYPE_RUNSTATE_UPDATE_FLAG: abi.KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG,
    abi.KVM_XEN_ATTR_TYPE_SHARED_INFO_HVA: abi.KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA,
}
_VCPU_ATTR_FEATURE = {
    abi.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADDR: abi.KVM_XEN_HVM_CONFIG_RUNSTATE,
    abi.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_CURRENT: abi.KVM_XEN_HVM_CONFIG_RUNSTATE,
    abi.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_DATA: abi.KVM_XEN_HVM_CONFIG_RUNSTATE,
    abi.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADJUST: abi.KVM_XEN_HVM_CONFIG_RUNSTATE,
    abi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_ID: abi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND,
    abi.KVM_XEN_VCPU_ATTR_TYPE_TIMER: abi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND,
    abi.KVM_XEN_VCPU_ATTR_TYPE_UPCALL_VECTOR: abi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND,
    abi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO_HVA: abi.KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA,
}


def _feature_names(bits: int) -> str:
    names = []
    for bit in range(bits.bit_length()):
        if bits >> bit & 1:
            names.append(_XEN_FEATURES.get(1 << bit, f"feature bit {1 << bit:#x}"))
    return " | ".join(names)


def _require_xen(vm: Vm, features: int, what: str) -> int:
    """KVM_CAP_XEN_HVM's feature mask if it holds every bit of features, else
    KvmUnsupported naming the capability and the missing bits."""
    supported = vm.require(abi.Capability.XEN_HVM, what)
    missing = features & ~supported
    if missing:
        raise KvmUnsupported(what, f"KVM_CAP_XEN_HVM with {_feature_names(missing)}")
    return supported


def _require_xen_attr(vm: Vm, features: dict[int, int], attr_type: int, what: str) -> None:
    """An attribute call needs SHARED_INFO, and the feature its type needs (features: the
    VM's or the vCPU's table; a type not listed needs only SHARED_INFO)."""
    feature = features.get(attr_type, abi.KVM_XEN_HVM_CONFIG_SHARED_INFO)
    _require_xen(vm, abi.KVM_XEN_HVM_CONFIG_SHARED_INFO | feature, what)


class HypervisorVm(Vm):
    """The VM calls of KVM's Xen HVM emulation and of its Hyper-V eventfds (x86)."""

    #: The calls made whose state snapshots do not carry: save_state() refuses while any
    #: is in effect, rather than save a VM that would come back without it.
    _unsaved: frozenset[str] = frozenset()

    # -- Xen HVM
    def set_xen_hvm_config(self, *, flags: int = 0, msr: int = 0, blob_addr_32: int = 0,
                           blob_addr_64: int = 0, blob_size_32: int = 0,
                           blob_size_64: int = 0) -> None:
        """KVM_XEN_HVM_CONFIG (KVM_CAP_XEN_HVM): make this a Xen HVM guest. msr is the MSR
        the guest writes to set up its hypercall page (KVM_XEN_MSR_MIN_INDEX..MAX_INDEX on
        current kernels; 0 for none); blob_addr_32/64 and blob_size_32/64 (in pages) are the
        host addresses of the 32- and 64-bit hypercall pages KVM copies into the guest.
        flags: KVM_XEN_HVM_CONFIG_* bits, each one KVM_CAP_XEN_HVM reports (else
        KvmUnsupported naming it); with KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL KVM writes the
        hypercall page itself and passes hypercalls out as KVM_EXIT_XEN, and every blob field
        must be 0 (ValueError)."""
        config = fill(abi.kvm_xen_hvm_config, flags=flags, msr=msr, blob_addr_32=blob_addr_32,
                      blob_addr_64=blob_addr_64, blob_size_32=blob_size_32,
                      blob_size_64=blob_size_64)
        if config.flags & abi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL and (
                blob_addr_32 or blob_addr_64 or blob_size_32 or blob_size_64):
            raise ValueError("set_xen_hvm_config(): with KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL KVM "
                             "writes the hypercall page itself: the blob addresses and sizes "
                             "must be 0")
        _require_xen(self, config.flags, "KVM_XEN_HVM_CONFIG")
        self.ioctl(abi.KVM_XEN_HVM_CONFIG, config)
        self._unsaved = self._unsaved | {"set_xen_hvm_config()"}

    def get_xen_hvm_attr(self, attr_type: int) -> abi.kvm_xen_hvm_attr:
        """KVM_XEN_HVM_GET_ATTR -> kvm_xen_hvm_attr (KVM_CAP_XEN_HVM with
        KVM_XEN_HVM_CONFIG_SHARED_INFO): one VM-wide Xen attribute, attr_type a
        KVM_XEN_ATTR_TYPE_* value; its value is in the matching member of u (u.long_mode,
        u.shared_info.gfn, ...)."""
        attr = fill(abi.kvm_xen_hvm_attr, {"type": "attr_type"}, type=attr_type)
        _require_xen_attr(self, _HVM_ATTR_FEATURE, attr.type, "KVM_XEN_HVM_GET_ATTR")
        self.ioctl(abi.KVM_XEN_HVM_GET_ATTR, attr)
        return attr

    def set_xen_hvm_attr(self, attr: abi.kvm_xen_hvm_attr) -> None:
        """KVM_XEN_HVM_SET_ATTR (KVM_CAP_XEN_HVM with KVM_XEN_HVM_CONFIG_SHARED_INFO): set
        one VM-wide Xen attribute, attr.type a KVM_XEN_ATTR_TYPE_* value and its value in
        the matching member of attr.u. The types added later need their own feature bit
        (EVTCHN and XEN_VERSION: EVTCHN_SEND; RUNSTATE_UPDATE_FLAG; SHARED_INFO_HVA)."""
        expect(attr, abi.kvm_xen_hvm_attr, "set_xen_hvm_attr()")
        _require_xen_attr(self, _HVM_ATTR_FEATURE, attr.type, "KVM_XEN_HVM_SET_ATTR")
        self.ioctl(abi.KVM_XEN_HVM_SET_ATTR, attr)
        self._unsaved = self._unsaved | {"set_xen_hvm_attr()"}

    def inject_xen_evtchn(self, port: int, vcpu: int,
                          priority: int = abi.KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL) -> None:
        """KVM_XEN_HVM_EVTCHN_SEND (KVM_CAP_XEN_HVM with KVM_XEN_HVM_CONFIG_EVTCHN_SEND):
        raise event channel `port` on the guest's Xen vCPU `vcpu` (its Xen vCPU id), as a
        Xen hypervisor would. priority: KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL, the only
        one KVM delivers."""
        req = fill(abi.kvm_irq_routing_xen_evtchn, port=port, vcpu=vcpu, priority=priority)
        _require_xen(self, abi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND, "KVM_XEN_HVM_EVTCHN_SEND")
        self.ioctl(abi.KVM_XEN_HVM_EVTCHN_SEND, req)

    # -- Hyper-V
    def add_hyperv_eventfd(self, conn_id: int, eventfd: int) -> None:
        """KVM_HYPERV_EVENTFD (KVM_CAP_HYPERV_EVENTFD): a guest's Hyper-V SIGNAL_EVENT
        hypercall on connection conn_id (24 bits) signals eventfd instead of exiting (one
        with a non-zero event flag number still exits). KvmError EEXIST if conn_id has one."""
        req = self._hyperv_eventfd(conn_id, {"fd": eventfd}, "add_hyperv_eventfd")
        self.require(abi.Capability.HYPERV_EVENTFD, "KVM_HYPERV_EVENTFD")
        self.ioctl(abi.KVM_HYPERV_EVENTFD, req)
        self._unsaved = self._unsaved | {f"add_hyperv_eventfd({req.conn_id:#x})"}

    def remove_hyperv_eventfd(self, conn_id: int) -> None:
        """KVM_HYPERV_EVENTFD with KVM_HYPERV_EVENTFD_DEASSIGN: undo add_hyperv_eventfd()
        for conn_id (the kernel needs no fd for it). KvmError ENOENT if it has none."""
        req = self._hyperv_eventfd(conn_id, {"flags": abi.KVM_HYPERV_EVENTFD_DEASSIGN},
                                   "remove_hyperv_eventfd")
        self.require(abi.Capability.HYPERV_EVENTFD, "KVM_HYPERV_EVENTFD")
        self.ioctl(abi.KVM_HYPERV_EVENTFD, req)
        self._unsaved = self._unsaved - {f"add_hyperv_eventfd({req.conn_id:#x})"}

    @staticmethod
    def _hyperv_eventfd(conn_id: int, fields: dict[str, int], call: str
                        ) -> abi.kvm_hyperv_eventfd:
        conn_id = check_field(conn_id, abi.kvm_hyperv_eventfd, "conn_id")
        if conn_id & ~abi.KVM_HYPERV_CONN_ID_MASK:
            raise ValueError(f"{call}(): conn_id {conn_id:#x} does not fit the "
                             f"{abi.KVM_HYPERV_CONN_ID_MASK.bit_length()} bits of "
                             f"KVM_HYPERV_CONN_ID_MASK ({abi.KVM_HYPERV_CONN_ID_MASK:#x})")
        return fill(abi.kvm_hyperv_eventfd, {"fd": "eventfd"}, conn_id=conn_id, **fields)


class HypervisorVcpu(Vcpu):
    """The vCPU calls of KVM's Xen HVM emulation (x86)."""

    #: As HypervisorVm._unsaved, for this vCPU.
    _unsaved: frozenset[str] = frozenset()

    def get_xen_vcpu_attr(self, attr_type: int) -> abi.kvm_xen_vcpu_attr:
        """KVM_XEN_VCPU_GET_ATTR -> kvm_xen_vcpu_attr (KVM_CAP_XEN_HVM with
        KVM_XEN_HVM_CONFIG_SHARED_INFO): one of this vCPU's Xen attributes, attr_type a
        KVM_XEN_VCPU_ATTR_TYPE_* value; its value is in the matching member of u (u.gpa,
        u.runstate, u.timer, ...)."""
        attr = fill(abi.kvm_xen_vcpu_attr, {"type": "attr_type"}, type=attr_type)
        self._require_vcpu_attr(attr, "KVM_XEN_VCPU_GET_ATTR")
        self.ioctl(abi.KVM_XEN_VCPU_GET_ATTR, attr)
        return attr

    def set_xen_vcpu_attr(self, attr: abi.kvm_xen_vcpu_attr) -> None:
        """KVM_XEN_VCPU_SET_ATTR (KVM_CAP_XEN_HVM with KVM_XEN_HVM_CONFIG_SHARED_INFO): set
        one of this vCPU's Xen attributes, attr.type a KVM_XEN_VCPU_ATTR_TYPE_* value and its
        value in the matching member of attr.u. The runstate types need
        KVM_XEN_HVM_CONFIG_RUNSTATE; VCPU_ID, TIMER and UPCALL_VECTOR need EVTCHN_SEND;
        VCPU_INFO_HVA needs SHARED_INFO_HVA."""
        expect(attr, abi.kvm_xen_vcpu_attr, "set_xen_vcpu_attr()")
        self._require_vcpu_attr(attr, "KVM_XEN_VCPU_SET_ATTR")
        self.ioctl(abi.KVM_XEN_VCPU_SET_ATTR, attr)
        self._unsaved = self._unsaved | {"set_xen_vcpu_attr()"}

    def _require_vcpu_attr(self, attr: abi.kvm_xen_vcpu_attr, what: str) -> None:
        self.fd  # noqa: B018 - a closed vCPU says so, whatever its VM answers
        _require_xen_attr(self.vm, _VCPU_ATTR_FEATURE, attr.type, what)

