"""kvm-bindings: the Linux KVM API for Python, generated from the kernel's headers.

Kvm (/dev/kvm) -> Vm (KVM_CREATE_VM) -> Vcpu (KVM_CREATE_VCPU) and Device, as in
the kernel. The generated ABI (constants, ctypes structs, ioctls) is
kvm_bindings.abi; its per-arch modules (kvm_bindings.abi.x86_64) import on any
host, so the runtime below is loaded only when one of its names is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Capability": "abi", "ExitReason": "abi",
    "Device": "device",
    "GuestMemoryError": "errors", "KvmError": "errors", "KvmUnavailable": "errors",
    "KvmUnsupported": "errors", "StaleExitError": "errors", "StaleHandleError": "errors",
    "VcpuBusyError": "errors",
    "Exit": "exits", "HltExit": "exits", "InterruptedExit": "exits", "IoExit": "exits",
    "MmioExit": "exits", "MsrExit": "exits", "PayloadExit": "exits", "ShutdownExit": "exits",
    "SimpleExit": "exits", "UnknownExit": "exits",
    "GuestMemfd": "memory", "GuestMemory": "memory", "MemoryRegion": "memory",
    "Kvm": "system", "Vcpu": "vcpu", "Vm": "vm",
}
__all__ = [
    "Capability",
    "Device",
    "Exit",
    "ExitReason",
    "GuestMemfd",
    "GuestMemory",
    "GuestMemoryError",
    "HltExit",
    "InterruptedExit",
    "IoExit",
    "Kvm",
    "KvmError",
    "KvmUnavailable",
    "KvmUnsupported",
    "MemoryRegion",
    "MmioExit",
    "MsrExit",
    "PayloadExit",
    "ShutdownExit",
    "SimpleExit",
    "StaleExitError",
    "StaleHandleError",
    "UnknownExit",
    "Vcpu",
    "VcpuBusyError",
    "Vm",
]

if TYPE_CHECKING:
    from .abi import Capability, ExitReason
    from .device import Device
    from .errors import (
        GuestMemoryError,
        KvmError,
        KvmUnavailable,
        KvmUnsupported,
        StaleExitError,
        StaleHandleError,
        VcpuBusyError,
    )
    from .exits import (
        Exit,
        HltExit,
        InterruptedExit,
        IoExit,
        MmioExit,
        MsrExit,
        PayloadExit,
        ShutdownExit,
        SimpleExit,
        UnknownExit,
    )
    from .memory import GuestMemfd, GuestMemory, MemoryRegion
    from .system import Kvm
    from .vcpu import Vcpu
    from .vm import Vm


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvm_bindings' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
