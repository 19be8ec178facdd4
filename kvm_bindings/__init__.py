"""kvm-bindings: the Linux KVM API for Python, generated from the kernel's headers.

Kvm (/dev/kvm) -> Vm (KVM_CREATE_VM) -> Vcpu (KVM_CREATE_VCPU) and Device, as in
the kernel. The generated ABI (constants, ctypes structs, ioctls) is
kvm_bindings.abi.
"""

from __future__ import annotations

from .abi import Capability, ExitReason
from .device import Device
from .errors import GuestMemoryError, KvmError, KvmUnavailable, KvmUnsupported
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
from .memory import GuestMemory, MemoryRegion
from .system import Kvm
from .vcpu import Vcpu
from .vm import Vm

__all__ = [
    "Capability", "Device", "Exit", "ExitReason", "GuestMemory", "GuestMemoryError", "HltExit",
    "InterruptedExit", "IoExit", "Kvm", "KvmError", "KvmUnavailable", "KvmUnsupported",
    "MemoryRegion", "MmioExit", "MsrExit", "PayloadExit", "ShutdownExit", "SimpleExit",
    "UnknownExit", "Vcpu", "Vm",
]
