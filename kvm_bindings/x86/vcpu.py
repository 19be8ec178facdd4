"""X86Vcpu: the x86 calls of a vCPU (registers, MSRs, CPUID, LAPIC, events, nested state)."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from .._layout import capacity, check_bool, check_field, check_flex, check_int, expect, fill
from ..abi import x86_64 as abi
from ..errors import KvmError, KvmUnsupported
from ..memory import PAGE_SIZE
from . import _cpuid, _hypervisors, _msrs, mce

if TYPE_CHECKING:
    from .vm import X86Vm

__all__ = ["X86Vcpu"]


class X86Vcpu(_hypervisors.HypervisorVcpu):
    """A vCPU of an x86 VM: everything Vcpu does, and the x86-only state ioctls.

    Each setter takes only its own struct: the kernel reads sizeof(that struct) bytes
    from whatever it is given.
    """

    vm: X86Vm
    # What set_vapic_addr() and set_tpr_access_reporting() last set (no ioctl reads them).
    _vapic_addr: int = 0
    _tpr_reporting: bool = False

    # -- registers
    def get_regs(self) -> abi.kvm_regs:
        """KVM_GET_REGS -> kvm_regs."""
        return self._get(abi.KVM_GET_REGS, abi.kvm_regs)

    def set_regs(self, regs: abi.kvm_regs) -> None:
        """KVM_SET_REGS."""
        self.ioctl(abi.KVM_SET_REGS, expect(regs, abi.kvm_regs, "set_regs()"))

    def get_sregs(self) -> abi.kvm_sregs:
        """KVM_GET_SREGS -> kvm_sregs."""
        return self._get(abi.KVM_GET_SREGS, abi.kvm_sregs)

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        """KVM_SET_SREGS."""
        self.ioctl(abi.KVM_SET_SREGS, expect(sregs, abi.kvm_sregs, "set_sregs()"))

    def get_sregs2(self) -> abi.kvm_sregs2:
        """KVM_GET_SREGS2 -> kvm_sregs2 (KVM_CAP_SREGS2): sregs plus the PDPTRs."""
        self.vm.require(abi.Capability.SREGS2, "KVM_GET_SREGS2")
        return self._get(abi.KVM_GET_SREGS2, abi.kvm_sregs2)

    def set_sregs2(self, sregs2: abi.kvm_sregs2) -> None:
        """KVM_SET_SREGS2 (KVM_CAP_SREGS2)."""
        self.vm.require(abi.Capability.SREGS2, "KVM_SET_SREGS2")
        self.ioctl(abi.KVM_SET_SREGS2, expect(sregs2, abi.kvm_sregs2, "set_sregs2()"))

    def get_fpu(self) -> abi.kvm_fpu:
        """KVM_GET_FPU -> kvm_fpu."""
        return self._get(abi.KVM_GET_FPU, abi.kvm_fpu)

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        """KVM_SET_FPU."""
        self.ioctl(abi.KVM_SET_FPU, expect(fpu, abi.kvm_fpu, "set_fpu()"))

    def get_xsave(self) -> abi.kvm_xsave:
        """KVM_GET_XSAVE -> kvm_xsave (the legacy 4 KiB area; see get_xsave2)."""
        self.vm.require(abi.Capability.XSAVE, "KVM_GET_XSAVE")
        return self._get(abi.KVM_GET_XSAVE, abi.kvm_xsave)

    def set_xsave(self, xsave: abi.kvm_xsave) -> None:
        """KVM_SET_XSAVE. Where KVM_CAP_XSAVE2 reports more than 4 KiB the kernel reads that
        many bytes, so the object must hold them (as get_xsave2()'s does)."""
        self.vm.require(abi.Capability.XSAVE, "KVM_SET_XSAVE")
        expect(xsave, abi.kvm_xsave, "set_xsave()")
        need = max(ctypes.sizeof(abi.kvm_xsave), self.vm.check_extension(abi.Capability.XSAVE2))
        if capacity(xsave) < need:
            raise ValueError(f"set_xsave(): this host's XSAVE state is {need} bytes and the kernel "
                             f"reads all of them, but the object holds {capacity(xsave)}; "
                             f"pass what get_xsave2() returned")
        self.ioctl(abi.KVM_SET_XSAVE, xsave)

    def get_xsave2(self) -> abi.kvm_xsave:
        """KVM_GET_XSAVE2 -> kvm_xsave sized by KVM_CAP_XSAVE2 (AMX and other large state)."""
        size = self.vm.require(abi.Capability.XSAVE2, "KVM_GET_XSAVE2")
        extra = max(0, size - ctypes.sizeof(abi.kvm_xsave)) // ctypes.sizeof(ctypes.c_uint32)
        xsave = abi.kvm_xsave.alloc(extra)
        self.ioctl(abi.KVM_GET_XSAVE2, xsave)
        return xsave

    def get_xcrs(self) -> abi.kvm_xcrs:
        """KVM_GET_XCRS -> kvm_xcrs (KVM_CAP_XCRS)."""
        self.vm.require(abi.Capability.XCRS, "KVM_GET_XCRS")
        return self._get(abi.KVM_GET_XCRS, abi.kvm_xcrs)

    def set_xcrs(self, xcrs: abi.kvm_xcrs) -> None:
        """KVM_SET_XCRS (KVM_CAP_XCRS)."""
        self.vm.require(abi.Capability.XCRS, "KVM_SET_XCRS")
        self.ioctl(abi.KVM_SET_XCRS, expect(xcrs, abi.kvm_xcrs, "set_xcrs()"))

    def get_lapic(self) -> abi.kvm_lapic_state:
        """KVM_GET_LAPIC -> kvm_lapic_state (needs the in-kernel irqchip)."""
        return self._get(abi.KVM_GET_LAPIC, abi.kvm_lapic_state)

    def set_lapic(self, lapic: abi.kvm_lapic_state) -> None:
        """KVM_SET_LAPIC (needs the in-kernel irqchip)."""
        self.ioctl(abi.KVM_SET_LAPIC, expect(lapic, abi.kvm_lapic_state, "set_lapic()"))

    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        """KVM_GET_VCPU_EVENTS -> kvm_vcpu_events (KVM_CAP_VCPU_EVENTS)."""
        self.vm.require(abi.Capability.VCPU_EVENTS, "KVM_GET_VCPU_EVENTS")
        return self._get(abi.KVM_GET_VCPU_EVENTS, abi.kvm_vcpu_events)

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        """KVM_SET_VCPU_EVENTS (KVM_CAP_VCPU_EVENTS)."""
        self.vm.require(abi.Capability.VCPU_EVENTS, "KVM_SET_VCPU_EVENTS")
        self.ioctl(abi.KVM_SET_VCPU_EVENTS, expect(events, abi.kvm_vcpu_events, "set_vcpu_events()"))

    def get_debugregs(self) -> abi.kvm_debugregs:
        """KVM_GET_DEBUGREGS -> kvm_debugregs (KVM_CAP_DEBUGREGS)."""
        self.vm.require(abi.Capability.DEBUGREGS, "KVM_GET_DEBUGREGS")
        return self._get(abi.KVM_GET_DEBUGREGS, abi.kvm_debugregs)

    def set_debugregs(self, debugregs: abi.kvm_debugregs) -> None:
        """KVM_SET_DEBUGREGS (KVM_CAP_DEBUGREGS)."""
        self.vm.require(abi.Capability.DEBUGREGS, "KVM_SET_DEBUGREGS")
        self.ioctl(abi.KVM_SET_DEBUGREGS, expect(debugregs, abi.kvm_debugregs, "set_debugregs()"))

    def set_guest_debug(self, control: int, debugreg: Iterable[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG (KVM_CAP_SET_GUEST_DEBUG): control is abi.GuestDebugFlag bits;
        debugreg fills arch.debugreg (DR0-DR3, DR6, DR7)."""
        self.vm.require(abi.Capability.SET_GUEST_DEBUG, "KVM_SET_GUEST_DEBUG")
        dbg = fill(abi.kvm_guest_debug, control=control)
        values = list(debugreg)
        if len(values) > len(dbg.arch.debugreg):
            raise ValueError(f"at most {len(dbg.arch.debugreg)} debug registers, not {len(values)}")
        for i, value in enumerate(values):
            dbg.arch.debugreg[i] = check_field(value, abi.kvm_guest_debug_arch, "debugreg",
                                               f"debugreg[{i}]", index=i)
        self.ioctl(abi.KVM_SET_GUEST_DEBUG, dbg)

    # -- MSRs and CPUID
    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS for these MSR indices -> {index: value} (only those KVM returned)."""
        msrs = _msrs.msrs(indices)
        return _msrs.msr_results(msrs, self.ioctl(abi.KVM_GET_MSRS, msrs))

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS for {index: value}; raises KvmError naming the first MSR KVM refused."""
        if not isinstance(values, Mapping):
            raise TypeError(f"set_msrs() takes a mapping of MSR index to value, not "
                            f"{type(values).__name__}")
        msrs = _msrs.msrs(values.keys(), values.values())
        done = self.ioctl(abi.KVM_SET_MSRS, msrs)
        if done != len(values):
            index = list(values)[done]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {index:#x} was refused")
        return done

    def set_cpuid2(self, cpuid: abi.kvm_cpuid2) -> None:
        """KVM_SET_CPUID2 with a kvm_cpuid2 (e.g. kvm.get_supported_cpuid())."""
        expect(cpuid, abi.kvm_cpuid2, "set_cpuid2()")
        self._set_cpuid(abi.KVM_SET_CPUID2, "KVM_SET_CPUID2", check_flex(cpuid, "set_cpuid2()"))

    def set_cpuid(self, cpuid: abi.kvm_cpuid) -> None:
        """KVM_SET_CPUID: the legacy form of set_cpuid2(), a kvm_cpuid whose entries have no
        subleaf index or flags (each becomes subleaf 0 of its leaf, so leaves with subleaves,
        such as 4, 7, 0xb and 0xd, get only their first). For VMMs written against it;
        prefer set_cpuid2(). get_cpuid2() reads back what was set."""
        expect(cpuid, abi.kvm_cpuid, "set_cpuid()")
        self._set_cpuid(abi.KVM_SET_CPUID, "KVM_SET_CPUID", check_flex(cpuid, "set_cpuid()"))

    def _set_cpuid(self, number: int, name: str, cpuid: abi.kvm_cpuid | abi.kvm_cpuid2) -> None:
        try:
            self.ioctl(number, cpuid, name=name)
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
            raise KvmError(name, e.errno, f"{cpuid.nent} entries are more than this kernel "
                                          f"takes in one CPUID (its KVM_MAX_CPUID_ENTRIES)") from None

    def get_cpuid2(self, max_entries: int = 256) -> abi.kvm_cpuid2:
        """KVM_GET_CPUID2: what was set, as a kvm_cpuid2."""
        cpuid = abi.kvm_cpuid2.alloc(check_field(max_entries, abi.kvm_cpuid2, "nent", "max_entries"))
        self.ioctl(abi.KVM_GET_CPUID2, cpuid)
        return cpuid

    def get_supported_hv_cpuid(self) -> abi.kvm_cpuid2:
        """KVM_GET_SUPPORTED_HV_CPUID on this vCPU (KVM_CAP_HYPERV_CPUID): the Hyper-V CPUID
        leaves KVM can offer it (eVMCS leaves included once enabled), as a kvm_cpuid2."""
        self.vm.require(abi.Capability.HYPERV_CPUID, "KVM_GET_SUPPORTED_HV_CPUID")
        return _cpuid.grown(lambda cpuid: self.ioctl(abi.KVM_GET_SUPPORTED_HV_CPUID, cpuid),
                            16, 1 << 10)

    def enable_sync_regs(self, valid: int) -> None:
        """Ask KVM to copy these register sets (abi.SyncRegs bits) into kvm_run.s on every exit
        (KVM_CAP_SYNC_REGS); read and change them in vcpu.kvm_run.s.regs, then mark_sync_regs_dirty()."""
        supported = self.vm.require(abi.Capability.SYNC_REGS, "kvm_run sync regs")
        fill(self.kvm_run, {"kvm_valid_regs": "valid"}, kvm_valid_regs=valid)
        if valid & ~supported:
            self.kvm_run.kvm_valid_regs = 0
            raise KvmUnsupported(f"sync regs {valid:#x}", "KVM_CAP_SYNC_REGS (those register sets)")

    def mark_sync_regs_dirty(self, regs: int) -> None:
        """Tell KVM to load these sync register sets from kvm_run.s on the next run."""
        fill(self.kvm_run, {"kvm_dirty_regs": "regs"}, kvm_dirty_regs=regs)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ (KVM_CAP_GET_TSC_KHZ)."""
        self.vm.require(abi.Capability.GET_TSC_KHZ, "KVM_GET_TSC_KHZ")
        return self.ioctl(abi.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ (KVM_CAP_TSC_CONTROL)."""
        # The ioctl's argument is an unsigned long, but the kernel keeps the frequency as a
        # u32 (kvm_set_tsc_khz): a larger value would be cut to its low 32 bits.
        khz = check_int(khz, ctypes.c_uint32, "khz")
        self.vm.require(abi.Capability.TSC_CONTROL, "KVM_SET_TSC_KHZ")
        self.ioctl(abi.KVM_SET_TSC_KHZ, khz)

    def notify_kvmclock_paused(self) -> None:
        """KVM_KVMCLOCK_CTRL (KVM_CAP_KVMCLOCK_CTRL): tell the guest's kvmclock that the host
        paused it, so its soft-lockup watchdog does not fire on resume. KvmError EINVAL if
        the guest has not enabled kvmclock (MSR_KVM_SYSTEM_TIME_NEW)."""
        self.vm.require(abi.Capability.KVMCLOCK_CTRL, "KVM_KVMCLOCK_CTRL")
        self.ioctl(abi.KVM_KVMCLOCK_CTRL)

    def pre_fault_memory(self, gpa: int, size: int, flags: int = 0) -> None:
        """KVM_PRE_FAULT_MEMORY (KVM_CAP_PRE_FAULT_MEMORY): map guest memory gpa..gpa+size
        into the stage-2 page tables now, as if this vCPU had touched it, so its first
        accesses take no fault. gpa and size are page-aligned and size is not 0; a range any
        byte of which no memory region backs raises GuestMemoryError before any ioctl.

        The kernel may stop partway (a signal, or memory slots changing: EINTR or EAGAIN,
        or success with part of the range left): this call asks again for what is left
        until all of it is mapped. flags: 0, the only value the kernel accepts today."""
        gpa = check_int(gpa, ctypes.c_uint64, "gpa")
        size = check_int(size, ctypes.c_uint64, "size")
        if size == 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError(f"pre_fault_memory(): gpa {gpa:#x} and size {size:#x} must be "
                             f"multiples of {PAGE_SIZE:#x}, and size not 0")
        self.fd  # noqa: B018 - a closed vCPU (or VM) refuses before the memory check
        self.vm.memory._pieces(gpa, size)       # GuestMemoryError for an unbacked byte
        req = fill(abi.kvm_pre_fault_memory, gpa=gpa, size=size, flags=flags)
        self.vm.require(abi.Capability.PRE_FAULT_MEMORY, "KVM_PRE_FAULT_MEMORY")
        while req.size:
            # The kernel moves gpa and size past what it mapped, so asking again with the
            # same struct goes on where it stopped.
            try:
                self.ioctl(abi.KVM_PRE_FAULT_MEMORY, req)
            except KvmError as e:
                if e.errno != errno.EAGAIN:
                    raise

    # -- machine checks
    def setup_mce(self, mcg_cap: int) -> None:
        """KVM_X86_SETUP_MCE (KVM_CAP_MCE): give this vCPU's machine-check unit the
        IA32_MCG_CAP mcg_cap: a bank count from 1 to KVM_CAP_MCE's value in the low byte,
        and feature bits (kvm_bindings.x86.mce.MCG_*) among kvm.get_mce_cap_supported()'s.
        Every bank's IA32_MCi_CTL, and IA32_MCG_CTL with MCG_CTL_P, start all ones (errors
        reported). Without this call a vCPU has KVM_CAP_MCE's count of banks and no
        feature bits. ValueError for a count or bit the kernel would refuse."""
        mcg_cap = check_int(mcg_cap, ctypes.c_uint64, "mcg_cap")
        most = self.vm.require(abi.Capability.MCE, "KVM_X86_SETUP_MCE")
        banks = mcg_cap & mce.MCG_CAP_COUNT
        if not 1 <= banks <= most:
            raise ValueError(f"setup_mce(): {banks} banks (mcg_cap's low byte); this host "
                             f"offers 1 to {most}")
        # The kernel also lets through bits 16-23 (the extended MSR count, unused by KVM).
        extra = mcg_cap & ~(self.vm.kvm.get_mce_cap_supported() | mce.MCG_CAP_COUNT | 0xFF0000)
        if extra:
            raise ValueError(f"setup_mce(): mcg_cap bits {extra:#x} are not among those this "
                             f"host supports (kvm.get_mce_cap_supported())")
        self.ioctl(abi.KVM_X86_SETUP_MCE, ctypes.c_uint64(mcg_cap))

    def inject_mce(self, bank: int, status: int, *, addr: int = 0, misc: int = 0,
                   mcg_status: int = mce.MCG_STATUS_MCIP | mce.MCG_STATUS_EIPV) -> bool:
        """KVM_X86_SET_MCE (KVM_CAP_MCE): report an error in machine-check bank `bank`: its
        IA32_MCi_STATUS becomes status (which must have MCI_STATUS_VAL), and ADDR and MISC
        addr and misc (kvm_bindings.x86.mce names the bits). True if the bank now holds the
        error, False if the kernel left it out, as hardware would:

        - An uncorrected error (MCI_STATUS_UC) also sets IA32_MCG_STATUS to mcg_status and
          raises #MC in the guest. It is left out while reporting is off: IA32_MCG_CTL (with
          MCG_CTL_P) or the bank's IA32_MCi_CTL not all ones. A vCPU's banks start off;
          setup_mce() turns them on, or the guest does. If a machine check is still in
          progress (MCG_STATUS_MCIP) or the guest has not set CR4.MCE, the vCPU shuts down
          instead (the next run() returns a ShutdownExit).
        - An uncorrected error with mcg_status 0 and none of MCI_STATUS_PCC, _S and _AR is
          one that needs no action (UCNA): it fills the bank whether reporting is on or not,
          and raises no #MC (a corrected-error interrupt, if the guest enabled CMCI).
        - A corrected error only fills the bank, for the guest to poll (marking an earlier
          corrected one overwritten, MCI_STATUS_OVER); over an uncorrected one it is left out
          and that one is marked overwritten.

        ValueError for a bank the vCPU does not have (see setup_mce()) or a status without
        MCI_STATUS_VAL."""
        req = fill(abi.kvm_x86_mce, bank=bank, status=status, addr=addr, misc=misc,
                   mcg_status=mcg_status)
        bank, status = req.bank, req.status         # plain ints from here on
        self.vm.require(abi.Capability.MCE, "KVM_X86_SET_MCE")
        if not status & mce.MCI_STATUS_VAL:
            raise ValueError("inject_mce(): status must have MCI_STATUS_VAL (bit 63) set: "
                             "the kernel refuses a bank without an error")
        bank_msrs = [mce.msr_mc_status(bank), mce.msr_mc_addr(bank), mce.msr_mc_misc(bank)]
        before = self.get_msrs([mce.MSR_IA32_MCG_CAP, *bank_msrs])
        banks = before.get(mce.MSR_IA32_MCG_CAP, 0) & mce.MCG_CAP_COUNT
        if bank >= banks:
            raise ValueError(f"inject_mce(): bank {bank}, but this vCPU has {banks} machine-check "
                             f"banks (0 to {banks - 1}; setup_mce() sets how many)")
        self.ioctl(abi.KVM_X86_SET_MCE, req)
        # The kernel does not say whether it kept the error: the bank does. Kept over an
        # earlier error, it is marked overwritten, except on the UCNA path; so an error
        # identical to the one the bank holds still tells keeping from leaving out.
        after = self.get_msrs(bank_msrs)
        ucna = (status & mce.MCI_STATUS_UC and not req.mcg_status
                and not status & (mce.MCI_STATUS_PCC | mce.MCI_STATUS_S | mce.MCI_STATUS_AR))
        expected = status
        if before.get(bank_msrs[0], 0) & mce.MCI_STATUS_VAL and not ucna:
            expected |= mce.MCI_STATUS_OVER
        return [after.get(i) for i in bank_msrs] == [expected, req.addr, req.misc]

    # -- the virtual APIC's task priority
    def set_vapic_addr(self, gpa: int) -> None:
        """KVM_SET_VAPIC_ADDR (KVM_CAP_VAPIC): keep the local APIC's task priority in the
        guest's memory at gpa (0 turns it off). At exits KVM takes the TPR from the 32-bit
        word's bits 0-7 (software-assisted KVM, one exit late), so a guest can raise its
        TPR with a plain store, no APIC access (the paravirtual TPR of old Windows guests).
        When KVM next evaluates interrupts (one arriving, or set_lapic()) it writes the
        word: TPR in bits 0-7, the highest in-service vector's class in bits 12-15, the
        highest pending vector in bits 24-31; a TPR the guest writes through the APIC alone
        is not copied there. Needs the in-kernel irqchip; the word must lie in guest memory
        (GuestMemoryError before any ioctl)."""
        self.fd  # noqa: B018 - a closed vCPU (or VM) refuses before the memory check
        gpa = check_field(gpa, abi.kvm_vapic_addr, "vapic_addr", "gpa")
        if gpa:
            self.vm.memory._pieces(gpa, ctypes.sizeof(ctypes.c_uint32))
        self.vm.require(abi.Capability.VAPIC, "KVM_SET_VAPIC_ADDR")
        self._require_lapic("KVM_SET_VAPIC_ADDR")
        self.ioctl(abi.KVM_SET_VAPIC_ADDR, fill(abi.kvm_vapic_addr, vapic_addr=gpa))
        self._vapic_addr = gpa          # the kernel cannot be asked: snapshots save this

    def set_tpr_access_reporting(self, enabled: bool) -> None:
        """KVM_TPR_ACCESS_REPORTING (KVM_CAP_VAPIC): with enabled, each guest access to the
        local APIC's TPR register that KVM emulates (through its MMIO page) stops the next
        run() with a TprAccessExit (.rip: the accessing instruction, already done; .is_write).
        What a VMM patching TPR accesses into vapic stores watches for. Needs the in-kernel
        irqchip; accesses that hardware virtualises (APICv, AVIC, x2APIC's MSR) are not seen.
        KVM reports at its next entry: a host that emulates several instructions before one
        (software-assisted KVM does) reports only after its next exit to user space, with
        .rip and .is_write overwritten by that exit's data (kvm_run shares the space)."""
        check_bool(enabled, "set_tpr_access_reporting()'s enabled")
        self.vm.require(abi.Capability.VAPIC, "KVM_TPR_ACCESS_REPORTING")
        # The kernel takes it without one too, and then never reports: refused here.
        self._require_lapic("KVM_TPR_ACCESS_REPORTING")
        self.ioctl(abi.KVM_TPR_ACCESS_REPORTING, fill(abi.kvm_tpr_access_ctl, enabled=int(enabled)))
        self._tpr_reporting = enabled

    def _require_lapic(self, name: str) -> None:
        try:
            self.get_lapic()
        except KvmError as e:
            raise KvmError(name, e.errno or errno.ENXIO,
                           "this vCPU has no in-kernel local APIC: vm.create_irqchip() before "
                           "creating it") from None

    def translate(self, linear_address: int) -> abi.kvm_translation:
        """KVM_TRANSLATE: walk the guest's page tables -> kvm_translation."""
        return self._get(abi.KVM_TRANSLATE, abi.kvm_translation, linear_address=linear_address)

    def inject_interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: queue an external interrupt (only without the in-kernel irqchip)."""
        self.ioctl(abi.KVM_INTERRUPT, fill(abi.kvm_interrupt, {"irq": "vector"}, irq=vector))

    def inject_nmi(self) -> None:
        """KVM_NMI: inject a non-maskable interrupt."""
        self.ioctl(abi.KVM_NMI)

    def inject_smi(self) -> None:
        """KVM_SMI: inject a system management interrupt (KVM_CAP_X86_SMM)."""
        self.vm.require(abi.Capability.X86_SMM, "KVM_SMI")
        self.ioctl(abi.KVM_SMI)

    def get_nested_state(self) -> abi.kvm_nested_state:
        """KVM_GET_NESTED_STATE -> kvm_nested_state with its data (KVM_CAP_NESTED_STATE)."""
        size = self.vm.require(abi.Capability.NESTED_STATE, "KVM_GET_NESTED_STATE")
        buf = (ctypes.c_uint8 * max(size, ctypes.sizeof(abi.kvm_nested_state)))()
        state = abi.kvm_nested_state.from_buffer(buf)
        state.size = len(buf)
        self.ioctl(abi.KVM_GET_NESTED_STATE, state)
        return state

    def set_nested_state(self, state: abi.kvm_nested_state) -> None:
        """KVM_SET_NESTED_STATE; the kernel reads state.size bytes, which the object must hold."""
        self.vm.require(abi.Capability.NESTED_STATE, "KVM_SET_NESTED_STATE")
        expect(state, abi.kvm_nested_state, "set_nested_state()")
        if state.size > capacity(state):
            raise ValueError(f"set_nested_state(): state.size is {state.size} but the object holds "
                             f"{capacity(state)} bytes; pass what get_nested_state() returned")
        self.ioctl(abi.KVM_SET_NESTED_STATE, state)
