"""What saving and restoring an x86 VM share: the names of the state, the setup calls a
restore makes again (as JSON), and holding vCPUs still while their state is read or set."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from ..abi import x86_64 as abi
from ..errors import PendingExitError, SnapshotError
from ..exits import InterruptedExit

if TYPE_CHECKING:
    from .vcpu import X86Vcpu
    from .vm import X86Vm

ARCH = "x86_64"
_MSR_BATCH = 64
# Exits whose instruction KVM finishes only on the next KVM_RUN (complete_userspace_io).
_COMPLETE_ON_RUN = frozenset({abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO, abi.KVM_EXIT_X86_RDMSR,
                              abi.KVM_EXIT_X86_WRMSR, abi.KVM_EXIT_HYPERCALL, abi.KVM_EXIT_XEN})
# The setup calls a restore makes again, by name: a snapshot names nothing else.
_REPLAYED = frozenset({"enable_cap", "enable_dirty_ring", "set_tss_addr", "set_identity_map_addr",
                       "set_boot_cpu_id", "create_irqchip", "create_pit2", "create_pit",
                       "set_pit_reinject", "set_nr_mmu_pages", "set_msr_filter", "set_pmu_event_filter",
                       "set_gsi_routing", "add_coalesced_mmio"})
_CHIPS = (("pic_master", abi.KVM_IRQCHIP_PIC_MASTER), ("pic_slave", abi.KVM_IRQCHIP_PIC_SLAVE),
          ("ioapic", abi.KVM_IRQCHIP_IOAPIC))


# ---- JSON for setup calls ---------------------------------------------------------------

def _to_json(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, (ctypes.Structure, ctypes.Union)):
        return {"struct": type(value).__name__, "bytes": bytes(value).hex()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and "bytes" in value:
        data = bytes.fromhex(value["bytes"])
        if "struct" not in value:
            return data
        ctype = getattr(abi, str(value["struct"]), None)
        if not isinstance(ctype, type) or not issubclass(ctype, (ctypes.Structure, ctypes.Union)):
            raise SnapshotError(f"a setup call names an unknown struct {value['struct']!r}")
        if len(data) != ctypes.sizeof(ctype):
            raise SnapshotError(f"{len(data)} bytes for a {ctype.__name__}")
        return ctype.from_buffer_copy(data)
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _calls(setup: Mapping[object, tuple[str, dict[str, Any]]]) -> list[list[Any]]:
    return [[call, _to_json(kwargs)] for call, kwargs in setup.values()]


# ---- vCPUs held still ---------------------------------------------------------------------

def _complete_pending(vcpu: X86Vcpu) -> None:
    """A vCPU stopped at an I/O, MMIO or MSR exit has half an instruction done: KVM finishes
    it (with the answer in data) on the next KVM_RUN. Run once with immediate_exit so it
    does, and comes straight back without entering the guest."""
    if vcpu.kvm_run.exit_reason not in _COMPLETE_ON_RUN:
        return
    vcpu.immediate_exit = True
    try:
        e = vcpu.run()
    finally:
        vcpu.immediate_exit = False
    if not isinstance(e, InterruptedExit):
        raise PendingExitError(vcpu.id, e)


@contextmanager
def _all_stopped(vm: X86Vm) -> Iterator[tuple[X86Vcpu, ...]]:
    vcpus = vm.vcpus
    with ExitStack() as stack:
        for vcpu in vcpus:
            stack.enter_context(vcpu._stopped())
        yield vcpus
