"""The declared table of enum classes: macro families that act as enums, and C enums.

A macro family is every object-like macro with the prefix, minus the declared
exclusions. A C-enum class (`enum` set) is that C enum's members, in its order,
minus the declared exclusions. Either way membership is declared here, never
guessed at render time: an excluded name (a mask, a sentinel, an offset,
another family's value) stays a plain module-level int and is not a member.
Every exclusion says why in one line. A class declared unique must not repeat a
value: a repeat means an exclusion is missing here, and the generator stops
rather than emit a wrong enum.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple


class Exclusion(NamedTuple):
    pattern: str   # a regex, matched against the whole C name
    reason: str


@dataclass(frozen=True)
class Family:
    name: str                     # the Python class name
    prefix: str                   # dropped from member names
    doc: str
    flag: bool = False            # IntFlag rather than IntEnum
    exclude: tuple[Exclusion, ...] = ()
    unique: bool = False
    enum: str | None = None       # a C enum's tag: the class holds that enum's members

    def excludes(self, name: str) -> bool:
        return any(re.fullmatch(x.pattern, name) for x in self.exclude)


def _x(pattern: str, reason: str) -> Exclusion:
    return Exclusion(pattern, reason)


FAMILIES: tuple[Family, ...] = (
    Family("ExitReason", "KVM_EXIT_", "Why KVM_RUN returned: kvm_run.exit_reason.",
           exclude=(_x(r"KVM_EXIT_IO_(IN|OUT)", "kvm_run.io.direction values: IoDirection"),
                    _x(r"KVM_EXIT_HYPERV_\w+", "kvm_hyperv_exit.type values, not exit reasons"),
                    _x(r"KVM_EXIT_XEN_\w+", "kvm_xen_exit.type values, not exit reasons"),
                    _x(r"KVM_EXIT_\w+_FLAG_\w+", "bits of an exit's own flags member "
                       "(kvm_run.arm_sea.flags)"),
                    _x(r"KVM_EXIT_HYPERCALL_\w+", "bits of kvm_run.hypercall.flags"),
                    _x(r"KVM_EXIT_FAIL_ENTRY_\w+",
                       "kvm_run.fail_entry.hardware_entry_failure_reason values")),
           unique=True),
    Family("IoDirection", "KVM_EXIT_IO_", "Direction of a KVM_EXIT_IO exit: kvm_run.io.direction.",
           unique=True),
    Family("Capability", "KVM_CAP_", "Capabilities, for KVM_CHECK_EXTENSION and KVM_ENABLE_CAP.",
           unique=True),
    Family("MemoryFlag", "KVM_MEM_", "Flags of a memory slot: kvm_userspace_memory_region.flags.",
           flag=True),
    Family("SystemEvent", "KVM_SYSTEM_EVENT_", "kvm_run.system_event.type.",
           exclude=(_x(r"KVM_SYSTEM_EVENT_\w+_FLAG_\w+",
                       "bits of kvm_run.system_event.data[0] (arm64 PSCI), not event types"),),
           unique=True),
    Family("InternalError", "KVM_INTERNAL_ERROR_", "kvm_run.internal.suberror.",
           exclude=(_x(r"KVM_INTERNAL_ERROR_\w+_FLAG_\w+",
                       "a bit of kvm_run.emulation_failure.flags, not a suberror"),),
           unique=True),
    Family("MpState", "KVM_MP_STATE_", "vCPU multiprocessing states: kvm_mp_state.mp_state.",
           unique=True),
    Family("IrqRoutingType", "KVM_IRQ_ROUTING_", "kvm_irq_routing_entry.type.",
           exclude=(_x(r"KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL",
                       "a kvm_irq_routing_xen_evtchn.priority value, not an entry type"),),
           unique=True),
    Family("GuestDebugFlag", "KVM_GUESTDBG_", "kvm_guest_debug.control.", flag=True),
    Family("IoeventfdFlag", "KVM_IOEVENTFD_FLAG_", "kvm_ioeventfd.flags.", flag=True),
    Family("IrqfdFlag", "KVM_IRQFD_FLAG_", "kvm_irqfd.flags.", flag=True),
    Family("MsrExitReason", "KVM_MSR_EXIT_REASON_", "Which MSR accesses exit to userspace "
           "(KVM_CAP_X86_USER_SPACE_MSR).", flag=True,
           exclude=(_x(r"KVM_MSR_EXIT_REASON_VALID_MASK", "a mask of all the reasons"),)),
    Family("VcpuEventsValid", "KVM_VCPUEVENT_VALID_", "kvm_vcpu_events.flags.", flag=True),
    Family("SyncRegs", "KVM_SYNC_X86_", "kvm_run.kvm_valid_regs / kvm_dirty_regs.", flag=True,
           exclude=(_x(r"KVM_SYNC_X86_VALID_FIELDS", "a mask of all the register sets"),)),
    Family("CpuidFlag", "KVM_CPUID_FLAG_", "kvm_cpuid_entry2.flags.", flag=True),
    Family("DisableExits", "KVM_X86_DISABLE_EXITS_", "KVM_CAP_X86_DISABLE_EXITS arguments.",
           flag=True),
    Family("X86Quirk", "KVM_X86_QUIRK_", "KVM_CAP_DISABLE_QUIRKS2 arguments.", flag=True),
    Family("MemoryAttribute", "KVM_MEMORY_ATTRIBUTE_", "KVM_SET_MEMORY_ATTRIBUTES flags.",
           flag=True),
    Family("DirtyLogFlag", "KVM_DIRTY_LOG_", "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags.", flag=True,
           exclude=(_x(r"KVM_DIRTY_LOG_PAGE_OFFSET",
                       "the dirty ring's mmap offset (in pages) on the vCPU fd, not a flag"),)),
    # C enums: one class each, named here, members without the C prefix.
    Family("DeviceType", "KVM_DEV_TYPE_", "Device types for KVM_CREATE_DEVICE.",
           enum="kvm_device_type", unique=True,
           exclude=(_x(r"KVM_DEV_TYPE_MAX", "sentinel: one past the last device type"),)),
    Family("SevCmdId", "KVM_SEV_", "SEV commands for KVM_MEMORY_ENCRYPT_OP: kvm_sev_cmd.id.",
           enum="sev_cmd_id", unique=True,
           exclude=(_x(r"KVM_SEV_NR_MAX", "sentinel: one past the last command"),)),
    Family("TdxCmdId", "KVM_TDX_", "TDX commands for KVM_MEMORY_ENCRYPT_OP: kvm_tdx_cmd.id.",
           enum="kvm_tdx_cmd_id", unique=True,
           exclude=(_x(r"KVM_TDX_CMD_NR_MAX", "sentinel: one past the last command"),)),
    Family("HardwareSubarch", "X86_", "The x86 platform a kernel boots on: "
           "setup_header.hardware_subarch.", enum="x86_hardware_subarch", unique=True,
           exclude=(_x(r"X86_NR_SUBARCHS", "sentinel: one past the last subarch"),)),
    Family("PvCmdId", "KVM_PV_", "s390 protected-virtualization commands: kvm_pv_cmd.cmd.",
           enum="pv_cmd_id", unique=True),
    Family("PvCmdDumpId", "KVM_PV_DUMP_", "KVM_PV_DUMP subcommands: kvm_s390_pv_dmp.subcmd.",
           enum="pv_cmd_dmp_id", unique=True),
    Family("PvCmdInfoId", "KVM_PV_INFO_", "KVM_PV_INFO subcommands: kvm_s390_pv_info_header.id.",
           enum="pv_cmd_info_id", unique=True),
    Family("SmcccFilterAction", "KVM_SMCCC_FILTER_", "kvm_smccc_filter.action.",
           enum="kvm_smccc_filter_action", unique=True),
    Family("RiscvIsaExtId", "KVM_RISCV_ISA_EXT_", "RISC-V ISA extensions, as KVM_REG_RISCV_ISA_EXT "
           "register numbers.", enum="KVM_RISCV_ISA_EXT_ID", unique=True,
           exclude=(_x(r"KVM_RISCV_ISA_EXT_MAX", "sentinel: one past the last extension"),)),
    Family("RiscvSbiExtId", "KVM_RISCV_SBI_EXT_", "RISC-V SBI extensions, as KVM_REG_RISCV_SBI_EXT "
           "register numbers.", enum="KVM_RISCV_SBI_EXT_ID", unique=True,
           exclude=(_x(r"KVM_RISCV_SBI_EXT_MAX", "sentinel: one past the last extension"),)),
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
