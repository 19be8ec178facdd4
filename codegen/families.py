"""The declared table of enum classes: C enums and macro families that act as enums.

A family is every object-like macro with the prefix, minus the declared
exclusions (macros that share the prefix but are not members). A family
declared unique must not repeat a value: a repeat means an exclusion is
missing here, and the generator stops rather than emit a wrong enum.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str                     # the Python class name
    prefix: str                   # dropped from member names
    doc: str
    flag: bool = False            # IntFlag rather than IntEnum
    exclude: tuple[str, ...] = ()  # regexes, matched against the whole macro name
    unique: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("ExitReason", "KVM_EXIT_", "Why KVM_RUN returned: kvm_run.exit_reason.",
           exclude=(r"KVM_EXIT_IO_(IN|OUT)", r"KVM_EXIT_HYPERV_\w+", r"KVM_EXIT_XEN_\w+",
                    r"KVM_EXIT_\w+_FLAG_\w+", r"KVM_EXIT_HYPERCALL_\w+",
                    r"KVM_EXIT_NOTIFY_\w+", r"KVM_EXIT_\w+_(VALID|MASK)\w*", r"KVM_EXIT_FAIL_ENTRY_\w+"),
           unique=True),
    Family("IoDirection", "KVM_EXIT_IO_", "Direction of a KVM_EXIT_IO exit: kvm_run.io.direction.",
           unique=True),
    Family("Capability", "KVM_CAP_", "Capabilities, for KVM_CHECK_EXTENSION and KVM_ENABLE_CAP.",
           unique=True),
    Family("MemoryFlag", "KVM_MEM_", "Flags of a memory slot: kvm_userspace_memory_region.flags.",
           flag=True),
    Family("SystemEvent", "KVM_SYSTEM_EVENT_", "kvm_run.system_event.type.",
           exclude=(r"KVM_SYSTEM_EVENT_\w*(FLAG|NDATA)\w*",), unique=True),
    Family("DeviceType", "KVM_DEV_TYPE_", "Device types for KVM_CREATE_DEVICE.",
           exclude=(r"KVM_DEV_TYPE_MAX",), unique=True),
    Family("InternalError", "KVM_INTERNAL_ERROR_", "kvm_run.internal.suberror.",
           exclude=(r"KVM_INTERNAL_ERROR_\w*_FLAG_\w+",), unique=True),
    Family("MpState", "KVM_MP_STATE_", "vCPU multiprocessing states: kvm_mp_state.mp_state.",
           unique=True),
    Family("IrqRoutingType", "KVM_IRQ_ROUTING_", "kvm_irq_routing_entry.type.",
           exclude=(r"KVM_IRQ_ROUTING_\w*_(FLAG|MAX)\w*",), unique=True),
    Family("GuestDebugFlag", "KVM_GUESTDBG_", "kvm_guest_debug.control.", flag=True),
    Family("IoeventfdFlag", "KVM_IOEVENTFD_FLAG_", "kvm_ioeventfd.flags.", flag=True,
           exclude=(r"KVM_IOEVENTFD_FLAG_NR_\w+",)),
    Family("IrqfdFlag", "KVM_IRQFD_FLAG_", "kvm_irqfd.flags.", flag=True),
    Family("MsrExitReason", "KVM_MSR_EXIT_REASON_", "Which MSR accesses exit to userspace "
           "(KVM_CAP_X86_USER_SPACE_MSR).", flag=True),
    Family("VcpuEventsValid", "KVM_VCPUEVENT_VALID_", "kvm_vcpu_events.flags.", flag=True),
    Family("SyncRegs", "KVM_SYNC_X86_", "kvm_run.kvm_valid_regs / kvm_dirty_regs.", flag=True),
    Family("CpuidFlag", "KVM_CPUID_FLAG_", "kvm_cpuid_entry2.flags.", flag=True),
    Family("DisableExits", "KVM_X86_DISABLE_EXITS_", "KVM_CAP_X86_DISABLE_EXITS arguments.",
           flag=True, exclude=(r"KVM_X86_DISABLE_EXITS_\w*VALID\w*",)),
    Family("X86Quirk", "KVM_X86_QUIRK_", "KVM_CAP_DISABLE_QUIRKS2 arguments.", flag=True),
    Family("MemoryAttribute", "KVM_MEMORY_ATTRIBUTE_", "KVM_SET_MEMORY_ATTRIBUTES flags.",
           flag=True),
    Family("DirtyLogFlag", "KVM_DIRTY_LOG_", "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags.", flag=True),
)

# Structs ending in a flexible array whose length another field holds.
FLEX_COUNT_FIELDS: dict[str, str] = {
    "kvm_msrs": "nmsrs",
    "kvm_msr_list": "nmsrs",
    "kvm_cpuid": "nent",
    "kvm_cpuid2": "nent",
    "kvm_irq_routing": "nr",
    "kvm_signal_mask": "len",
    "kvm_reg_list": "n",
    "kvm_pmu_event_filter": "nevents",
}
