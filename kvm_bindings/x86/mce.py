"""Machine-check architecture: the MSR bits a VMM needs to inject a machine check
(vcpu.setup_mce(), vcpu.inject_mce()). These are the CPU's own bit positions (Intel SDM
vol. 3B ch. 16, AMD APM vol. 2 ch. 9), not KVM's ABI, so the kernel's uapi headers do not
carry them.
"""

from __future__ import annotations

__all__ = [
    "MCG_CAP_COUNT", "MCG_CMCI_P", "MCG_CTL_P", "MCG_LMCE_P", "MCG_SER_P", "MCG_STATUS_EIPV",
    "MCG_STATUS_LMCES", "MCG_STATUS_MCIP", "MCG_STATUS_RIPV", "MCI_STATUS_ADDRV",
    "MCI_STATUS_AR", "MCI_STATUS_EN", "MCI_STATUS_MISCV", "MCI_STATUS_OVER", "MCI_STATUS_PCC", "MCI_STATUS_S",
    "MCI_STATUS_UC", "MCI_STATUS_VAL", "MSR_IA32_MCG_CAP", "MSR_IA32_MCG_STATUS",
    "MSR_IA32_MCG_CTL", "msr_mc_ctl", "msr_mc_status", "msr_mc_addr", "msr_mc_misc",
]

# IA32_MCG_CAP: the bank count (low byte) and what the machine-check unit offers.
MCG_CAP_COUNT = 0xFF
MCG_CTL_P = 1 << 8          # IA32_MCG_CTL exists
MCG_CMCI_P = 1 << 10        # corrected-error interrupts
MCG_SER_P = 1 << 24         # software error recovery
MCG_LMCE_P = 1 << 27        # local machine checks

# IA32_MCG_STATUS
MCG_STATUS_RIPV = 1 << 0    # the interrupted RIP can be restarted
MCG_STATUS_EIPV = 1 << 1    # the interrupted RIP is where the error happened
MCG_STATUS_MCIP = 1 << 2    # a machine check is in progress
MCG_STATUS_LMCES = 1 << 3   # the machine check went to this CPU alone

# IA32_MCi_STATUS
MCI_STATUS_VAL = 1 << 63    # the bank holds an error
MCI_STATUS_OVER = 1 << 62   # an earlier error was overwritten
MCI_STATUS_UC = 1 << 61     # uncorrected: raises #MC
MCI_STATUS_EN = 1 << 60     # error reporting was enabled
MCI_STATUS_MISCV = 1 << 59  # IA32_MCi_MISC holds information
MCI_STATUS_ADDRV = 1 << 58  # IA32_MCi_ADDR holds the address
MCI_STATUS_PCC = 1 << 57    # the processor context is corrupt
MCI_STATUS_S = 1 << 56      # signalled as a machine check (SER)
MCI_STATUS_AR = 1 << 55     # action required (SER)

MSR_IA32_MCG_CAP = 0x179
MSR_IA32_MCG_STATUS = 0x17A
MSR_IA32_MCG_CTL = 0x17B
_MSR_IA32_MC0_CTL = 0x400   # bank i's four MSRs: 0x400 + 4i (CTL, STATUS, ADDR, MISC)


def msr_mc_ctl(bank: int) -> int:
    """IA32_MCi_CTL of this bank."""
    return _MSR_IA32_MC0_CTL + 4 * bank


def msr_mc_status(bank: int) -> int:
    """IA32_MCi_STATUS of this bank."""
    return _MSR_IA32_MC0_CTL + 4 * bank + 1


def msr_mc_addr(bank: int) -> int:
    """IA32_MCi_ADDR of this bank."""
    return _MSR_IA32_MC0_CTL + 4 * bank + 2


def msr_mc_misc(bank: int) -> int:
    """IA32_MCi_MISC of this bank."""
    return _MSR_IA32_MC0_CTL + 4 * bank + 3
