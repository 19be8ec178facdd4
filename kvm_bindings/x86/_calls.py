"""The x86 calls (X86Kvm, X86Vm, X86Vcpu), declared as kvm_bindings._calls declares the
arch-neutral ones; and the KVM ioctls of the x86_64 ABI that no call issues, each with why.
"""

from __future__ import annotations

from .._calls import Call

__all__ = ["CALLS", "OMITTED"]

CALLS: tuple[Call, ...] = (
    Call("system", "kvm.get_supported_cpuid", ("KVM_GET_SUPPORTED_CPUID",), "KVM_CAP_EXT_CPUID"),
    Call("system", "kvm.get_emulated_cpuid", ("KVM_GET_EMULATED_CPUID",), "KVM_CAP_EXT_EMUL_CPUID"),
    Call("system", "kvm.get_supported_hv_cpuid", ("KVM_GET_SUPPORTED_HV_CPUID",),
         "KVM_CAP_SYS_HYPERV_CPUID"),
    Call("system", "kvm.get_msr_index_list", ("KVM_GET_MSR_INDEX_LIST",), None),
    Call("system", "kvm.get_msr_feature_index_list", ("KVM_GET_MSR_FEATURE_INDEX_LIST",),
         "KVM_CAP_GET_MSR_FEATURES"),
    Call("system", "kvm.get_feature_msrs", ("KVM_GET_MSRS",), None),

    Call("vm", "vm.set_tss_addr", ("KVM_SET_TSS_ADDR",), None),
    Call("vm", "vm.set_identity_map_addr", ("KVM_SET_IDENTITY_MAP_ADDR",),
         "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    Call("vm", "vm.set_boot_cpu_id", ("KVM_SET_BOOT_CPU_ID",), "KVM_CAP_SET_BOOT_CPU_ID"),
    Call("vm", "vm.set_nr_mmu_pages", ("KVM_SET_NR_MMU_PAGES",), "KVM_CAP_MMU_SHADOW_CACHE_CONTROL"),
    Call("vm", "vm.get_nr_mmu_pages", ("KVM_GET_NR_MMU_PAGES",), "KVM_CAP_MMU_SHADOW_CACHE_CONTROL"),
    # No capability announces memory encryption: the kernel's ENOTTY becomes KvmUnsupported.
    Call("vm", "vm.memory_encrypt_op", ("KVM_MEMORY_ENCRYPT_OP",), None),
    Call("vm", "vm.add_encrypted_region", ("KVM_MEMORY_ENCRYPT_REG_REGION",), None),
    Call("vm", "vm.remove_encrypted_region", ("KVM_MEMORY_ENCRYPT_UNREG_REGION",), None),
    Call("vm", "vm.create_irqchip", ("KVM_CREATE_IRQCHIP",), "KVM_CAP_IRQCHIP"),
    Call("vm", "vm.get_irqchip", ("KVM_GET_IRQCHIP",), None),
    Call("vm", "vm.set_irqchip", ("KVM_SET_IRQCHIP",), None),
    Call("vm", "vm.create_pit2", ("KVM_CREATE_PIT2",), "KVM_CAP_PIT2"),
    Call("vm", "vm.get_pit2", ("KVM_GET_PIT2",), None),
    Call("vm", "vm.set_pit2", ("KVM_SET_PIT2",), None),
    Call("vm", "vm.create_pit", ("KVM_CREATE_PIT",), "KVM_CAP_PIT"),
    Call("vm", "vm.get_pit", ("KVM_GET_PIT",), "KVM_CAP_PIT"),
    Call("vm", "vm.set_pit", ("KVM_SET_PIT",), "KVM_CAP_PIT"),
    Call("vm", "vm.set_pit_reinject", ("KVM_REINJECT_CONTROL",), "KVM_CAP_REINJECT_CONTROL"),
    Call("vm", "vm.get_clock", ("KVM_GET_CLOCK",), None),
    Call("vm", "vm.set_clock", ("KVM_SET_CLOCK",), None),
    Call("vm", "vm.set_msr_filter", ("KVM_X86_SET_MSR_FILTER",), "KVM_CAP_X86_MSR_FILTER"),

    Call("vcpu", "vcpu.get_regs", ("KVM_GET_REGS",), None),
    Call("vcpu", "vcpu.set_regs", ("KVM_SET_REGS",), None),
    Call("vcpu", "vcpu.get_sregs", ("KVM_GET_SREGS",), None),
    Call("vcpu", "vcpu.set_sregs", ("KVM_SET_SREGS",), None),
    Call("vcpu", "vcpu.get_sregs2", ("KVM_GET_SREGS2",), "KVM_CAP_SREGS2"),
    Call("vcpu", "vcpu.set_sregs2", ("KVM_SET_SREGS2",), "KVM_CAP_SREGS2"),
    Call("vcpu", "vcpu.get_fpu", ("KVM_GET_FPU",), None),
    Call("vcpu", "vcpu.set_fpu", ("KVM_SET_FPU",), None),
    Call("vcpu", "vcpu.get_xsave", ("KVM_GET_XSAVE",), "KVM_CAP_XSAVE"),
    Call("vcpu", "vcpu.set_xsave", ("KVM_SET_XSAVE",), "KVM_CAP_XSAVE"),
    Call("vcpu", "vcpu.get_xsave2", ("KVM_GET_XSAVE2",), "KVM_CAP_XSAVE2"),
    Call("vcpu", "vcpu.get_xcrs", ("KVM_GET_XCRS",), "KVM_CAP_XCRS"),
    Call("vcpu", "vcpu.set_xcrs", ("KVM_SET_XCRS",), "KVM_CAP_XCRS"),
    Call("vcpu", "vcpu.get_lapic", ("KVM_GET_LAPIC",), None),
    Call("vcpu", "vcpu.set_lapic", ("KVM_SET_LAPIC",), None),
    Call("vcpu", "vcpu.get_vcpu_events", ("KVM_GET_VCPU_EVENTS",), "KVM_CAP_VCPU_EVENTS"),
    Call("vcpu", "vcpu.set_vcpu_events", ("KVM_SET_VCPU_EVENTS",), "KVM_CAP_VCPU_EVENTS"),
    Call("vcpu", "vcpu.get_debugregs", ("KVM_GET_DEBUGREGS",), "KVM_CAP_DEBUGREGS"),
    Call("vcpu", "vcpu.set_debugregs", ("KVM_SET_DEBUGREGS",), "KVM_CAP_DEBUGREGS"),
    Call("vcpu", "vcpu.get_msrs", ("KVM_GET_MSRS",), None),
    Call("vcpu", "vcpu.set_msrs", ("KVM_SET_MSRS",), None),
    Call("vcpu", "vcpu.set_cpuid2", ("KVM_SET_CPUID2",), None),
    Call("vcpu", "vcpu.get_cpuid2", ("KVM_GET_CPUID2",), None),
    Call("vcpu", "vcpu.get_supported_hv_cpuid", ("KVM_GET_SUPPORTED_HV_CPUID",),
         "KVM_CAP_HYPERV_CPUID"),
    Call("vcpu", "vcpu.get_tsc_khz", ("KVM_GET_TSC_KHZ",), "KVM_CAP_GET_TSC_KHZ"),
    Call("vcpu", "vcpu.set_tsc_khz", ("KVM_SET_TSC_KHZ",), "KVM_CAP_TSC_CONTROL"),
    Call("vcpu", "vcpu.notify_kvmclock_paused", ("KVM_KVMCLOCK_CTRL",), "KVM_CAP_KVMCLOCK_CTRL"),
    Call("vcpu", "vcpu.pre_fault_memory", ("KVM_PRE_FAULT_MEMORY",), "KVM_CAP_PRE_FAULT_MEMORY"),
    Call("vcpu", "vcpu.translate", ("KVM_TRANSLATE",), None),
    Call("vcpu", "vcpu.inject_interrupt", ("KVM_INTERRUPT",), None),
    Call("vcpu", "vcpu.inject_nmi", ("KVM_NMI",), None),
    Call("vcpu", "vcpu.inject_smi", ("KVM_SMI",), "KVM_CAP_X86_SMM"),
    Call("vcpu", "vcpu.get_nested_state", ("KVM_GET_NESTED_STATE",), "KVM_CAP_NESTED_STATE"),
    Call("vcpu", "vcpu.set_nested_state", ("KVM_SET_NESTED_STATE",), "KVM_CAP_NESTED_STATE"),
)

_PENDING = "pending: issue 14"

#: KVM ioctls (KVMIO) of the x86_64 ABI that no call issues: {name: why}. The generic
#: linux/kvm.h defines some for every arch; the rest are x86 calls still to write.
OMITTED: dict[str, str] = {
    "KVM_S390_ENABLE_SIE": "s390 only: enables SIE for the calling process",
    "KVM_S390_VCPU_FAULT": "s390 only: faults in a guest page",
    "KVM_S390_KEYOP": "s390 only: storage-key operations",
    "KVM_S390_STORE_STATUS": "s390 only: stores a vCPU's status to guest memory",
    "KVM_S390_INITIAL_RESET": "s390 only: vCPU initial reset",
    "KVM_S390_NORMAL_RESET": "s390 only: vCPU normal reset",
    "KVM_S390_CLEAR_RESET": "s390 only: vCPU clear reset",
    "KVM_PPC_ALLOCATE_HTAB": "ppc only: the hashed page table of a Book3S HV guest",
    "KVM_PPC_SVM_OFF": "ppc only: turns a secure (ultravisor) guest back into a normal one",
    "KVM_DIRTY_TLB": "ppc booke only: the software-managed TLB (KVM_CAP_SW_TLB)",
    "KVM_ARM_SET_DEVICE_ADDR": "arm only: places the vGIC, which arm64 does with device attributes",
    "KVM_ARM_VCPU_FINALIZE": "arm64 only: Arm64Vcpu.finalize()",
    "KVM_X86_GET_MCE_CAP_SUPPORTED": _PENDING,
    "KVM_X86_SETUP_MCE": _PENDING,
    "KVM_X86_SET_MCE": _PENDING,
    "KVM_SET_PMU_EVENT_FILTER": _PENDING,
    "KVM_SET_VAPIC_ADDR": _PENDING,
    "KVM_TPR_ACCESS_REPORTING": _PENDING,
    "KVM_SET_CPUID": _PENDING,
    "KVM_XEN_HVM_CONFIG": _PENDING,
    "KVM_XEN_HVM_GET_ATTR": _PENDING,
    "KVM_XEN_HVM_SET_ATTR": _PENDING,
    "KVM_XEN_VCPU_GET_ATTR": _PENDING,
    "KVM_XEN_VCPU_SET_ATTR": _PENDING,
    "KVM_XEN_HVM_EVTCHN_SEND": _PENDING,
    "KVM_HYPERV_EVENTFD": _PENDING,
}
