"""kvm-bindings: the Linux KVM API for Python, generated from the kernel's headers.

Kvm (/dev/kvm) -> Vm (KVM_CREATE_VM) -> Vcpu (KVM_CREATE_VCPU) and Device, as in
the kernel. Kvm, Vm and Vcpu here are the host arch's classes (on x86_64:
kvm_bindings.x86.X86Kvm, X86Vm, X86Vcpu), which add that arch's calls to the
arch-neutral ones in kvm_bindings.system, .vm and .vcpu. The generated ABI
(constants, ctypes structs, ioctls) is kvm_bindings.abi; its per-arch modules
(kvm_bindings.abi.x86_64) import on any host, so the runtime below is loaded
only when one of its names is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

_EXPORTS = {
    "Capability": "abi", "ExitReason": "abi", "Backing": "backing", "DirtyBitmap": "dirty",
    "Device": "device",
    "BootError": "errors", "GuestMemoryError": "errors", "KvmError": "errors",
    "KvmUnavailable": "errors",
    "KvmUnsupported": "errors", "PendingExitError": "errors", "RestoreError": "errors",
    "SnapshotError": "errors", "StaleExitError": "errors", "StaleHandleError": "errors",
    "VcpuBusyError": "errors", "VmState": "snapshot", "VcpuState": "snapshot",
    "MemorySlotState": "snapshot",
    **{name: "exits" for name in (
        "ApResetHoldExit",
        "ArmLdst64bExit",
        "ArmNisvExit",
        "ArmSeaExit",
        "DcrExit",
        "DebugExit",
        "DirtyRingFullExit",
        "EprExit",
        "ExceptionExit",
        "Exit",
        "FailEntryExit",
        "HltExit",
        "HypercallExit",
        "HypervExit",
        "InternalErrorExit",
        "InterruptedExit",
        "IoExit",
        "IoapicEoiExit",
        "IrqWindowOpenExit",
        "LoongarchIocsrExit",
        "MemoryFaultExit",
        "MmioExit",
        "MsrExit",
        "NmiExit",
        "NotifyExit",
        "OsiExit",
        "PaprHcallExit",
        "PayloadExit",
        "RiscvCsrExit",
        "RiscvSbiExit",
        "S390ResetExit",
        "S390SieicExit",
        "S390StsiExit",
        "S390TschExit",
        "S390UcontrolExit",
        "SetTprExit",
        "ShutdownExit",
        "SimpleExit",
        "SnpReqCertsExit",
        "SystemEventExit",
        "TdxExit",
        "TprAccessExit",
        "UnknownExit",
        "UnknownHardwareExit",
        "WatchdogExit",
        "X86BusLockExit",
        "X86RdmsrExit",
        "X86WrmsrExit",
        "XenExit",
    )},
    "GuestMemfd": "memory", "GuestMemory": "memory", "MemoryRegion": "memory",
    "Stats": "stats", "StatDescriptor": "stats",
}
# The host arch's classes: {public name: (arch package, class)}; the arch-neutral ones
# (kvm_bindings.system.Kvm, ...) on a host with no arch package.
_HOST_CLASSES = {
    "x86_64": {"Kvm": ("x86", "X86Kvm"), "Vm": ("x86", "X86Vm"), "Vcpu": ("x86", "X86Vcpu")},
    "arm64": {"Kvm": ("arm64", "Arm64Kvm"), "Vm": ("arm64", "Arm64Vm"),
              "Vcpu": ("arm64", "Arm64Vcpu")},
    "riscv64": {"Kvm": ("riscv64", "Riscv64Kvm"), "Vm": ("riscv64", "Riscv64Vm"),
                "Vcpu": ("riscv64", "Riscv64Vcpu")},
}
# Type checkers cannot know the machine: to them Kvm/Vm/Vcpu are x86_64's classes, as
# kvm_bindings.abi is x86_64's ABI, unless told otherwise the way kvm_bindings.abi's
# docstring says (mypy: always_true = KVM_BINDINGS_TYPING_ARM64; pyright: defineConstant,
# with every KVM_BINDINGS_TYPING_* constant set).
# mypy: always-false="KVM_BINDINGS_TYPING_ARM64, KVM_BINDINGS_TYPING_RISCV64"
KVM_BINDINGS_TYPING_ARM64 = False
KVM_BINDINGS_TYPING_RISCV64 = False
_NEUTRAL = {"Kvm": "system", "Vm": "vm", "Vcpu": "vcpu"}
__all__ = [
    "ApResetHoldExit",
    "ArmLdst64bExit",
    "ArmNisvExit",
    "ArmSeaExit",
    "Backing",
    "BootError",
    "Capability",
    "DcrExit",
    "DebugExit",
    "Device",
    "DirtyBitmap",
    "DirtyRingFullExit",
    "EprExit",
    "ExceptionExit",
    "Exit",
    "ExitReason",
    "FailEntryExit",
    "GuestMemfd",
    "GuestMemory",
    "GuestMemoryError",
    "HltExit",
    "HypercallExit",
    "HypervExit",
    "InternalErrorExit",
    "InterruptedExit",
    "IoapicEoiExit",
    "IoExit",
    "IrqWindowOpenExit",
    "Kvm",
    "KvmError",
    "KvmUnavailable",
    "KvmUnsupported",
    "LoongarchIocsrExit",
    "MemoryFaultExit",
    "MemoryRegion",
    "MemorySlotState",
    "MmioExit",
    "MsrExit",
    "NmiExit",
    "NotifyExit",
    "OsiExit",
    "PaprHcallExit",
    "PayloadExit",
    "PendingExitError",
    "RestoreError",
    "RiscvCsrExit",
    "RiscvSbiExit",
    "S390ResetExit",
    "S390SieicExit",
    "S390StsiExit",
    "S390TschExit",
    "S390UcontrolExit",
    "SetTprExit",
    "ShutdownExit",
    "SimpleExit",
    "SnapshotError",
    "SnpReqCertsExit",
    "StaleExitError",
    "StaleHandleError",
    "StatDescriptor",
    "Stats",
    "SystemEventExit",
    "TdxExit",
    "TprAccessExit",
    "UnknownExit",
    "UnknownHardwareExit",
    "Vcpu",
    "VcpuBusyError",
    "VcpuState",
    "Vm",
    "VmState",
    "WatchdogExit",
    "X86BusLockExit",
    "X86RdmsrExit",
    "X86WrmsrExit",
    "XenExit",
]

if TYPE_CHECKING:
    from .abi import Capability, ExitReason
    from .backing import Backing
    from .device import Device
    from .dirty import DirtyBitmap
    from .errors import (
        BootError,
        GuestMemoryError,
        KvmError,
        KvmUnavailable,
        KvmUnsupported,
        PendingExitError,
        RestoreError,
        SnapshotError,
        StaleExitError,
        StaleHandleError,
        VcpuBusyError,
    )
    from .exits import (
        ApResetHoldExit,
        ArmLdst64bExit,
        ArmNisvExit,
        ArmSeaExit,
        DcrExit,
        DebugExit,
        DirtyRingFullExit,
        EprExit,
        ExceptionExit,
        Exit,
        FailEntryExit,
        HltExit,
        HypercallExit,
        HypervExit,
        InternalErrorExit,
        InterruptedExit,
        IoapicEoiExit,
        IoExit,
        IrqWindowOpenExit,
        LoongarchIocsrExit,
        MemoryFaultExit,
        MmioExit,
        MsrExit,
        NmiExit,
        NotifyExit,
        OsiExit,
        PaprHcallExit,
        PayloadExit,
        RiscvCsrExit,
        RiscvSbiExit,
        S390ResetExit,
        S390SieicExit,
        S390StsiExit,
        S390TschExit,
        S390UcontrolExit,
        SetTprExit,
        ShutdownExit,
        SimpleExit,
        SnpReqCertsExit,
        SystemEventExit,
        TdxExit,
        TprAccessExit,
        UnknownExit,
        UnknownHardwareExit,
        WatchdogExit,
        X86BusLockExit,
        X86RdmsrExit,
        X86WrmsrExit,
        XenExit,
    )
    from .memory import GuestMemfd, GuestMemory, MemoryRegion
    from .snapshot import MemorySlotState, VcpuState, VmState
    from .stats import StatDescriptor, Stats

    if KVM_BINDINGS_TYPING_ARM64:
        from .arm64 import Arm64Kvm as Kvm
        from .arm64 import Arm64Vcpu as Vcpu
        from .arm64 import Arm64Vm as Vm
    elif KVM_BINDINGS_TYPING_RISCV64:
        from .riscv64 import Riscv64Kvm as Kvm
        from .riscv64 import Riscv64Vcpu as Vcpu
        from .riscv64 import Riscv64Vm as Vm
    else:
        from .x86 import X86Kvm as Kvm
        from .x86 import X86Vcpu as Vcpu
        from .x86 import X86Vm as Vm


def __getattr__(name: str) -> object:
    import importlib
    if name in _NEUTRAL:
        from .abi import HOST_ARCH
        module, attr = _HOST_CLASSES.get(HOST_ARCH or "", {}).get(name, (_NEUTRAL[name], name))
    elif name in _EXPORTS:
        module, attr = _EXPORTS[name], name
    else:
        raise AttributeError(f"module 'kvm_bindings' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
