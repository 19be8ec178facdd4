"""An instruction KVM could not emulate is named by its bytes (InternalErrorExit.instruction).

The oracle for a real guest is the guest's own memory at its RIP; the decoding of each
kind of internal error is checked on payloads laid out by the generated structs.
"""

from __future__ import annotations

import ctypes

from kvm_bindings import InternalErrorExit, IoExit, x86
from kvm_bindings.abi import x86_64 as abi

from .conftest import GDT_ADDR, LOAD_ADDR


def test_a_guest_stopped_by_an_emulation_failure_shows_the_bytes_at_its_rip(vm, assemble):
    code = assemble("x87")
    vm.memory.write(LOAD_ADDR, code)
    vcpu = vm.create_vcpu(0)
    x86.setup_long_mode(vcpu, vm.memory, LOAD_ADDR, page_tables=0x8000, gdt_addr=GDT_ADDR)
    e = vcpu.run()
    if isinstance(e, IoExit):           # a host whose KVM runs x87 code in a guest
        assert e.port == 0x3F8
        return
    # This host: KVM stops at the first x87 instruction and says which bytes it fetched.
    assert isinstance(e, InternalErrorExit) and e.suberror == abi.InternalError.EMULATION
    rip = vcpu.get_regs().rip
    assert LOAD_ADDR <= rip < LOAD_ADDR + len(code)
    assert e.instruction and vm.memory.read(rip, len(e.instruction)) == e.instruction


def _exit(**fields) -> InternalErrorExit:
    """An InternalErrorExit over a kvm_run_internal whose bytes are an emulation_failure."""
    failure = abi.kvm_run_emulation_failure()
    for name, value in fields.items():
        setattr(failure, name, value)
    internal = abi.kvm_run_internal()
    ctypes.memmove(ctypes.addressof(internal), ctypes.addressof(failure), ctypes.sizeof(failure))
    e = InternalErrorExit.__new__(InternalErrorExit)
    e._payload = internal
    return e


def test_the_instruction_is_only_what_kvm_says_it_fetched():
    e = _exit(suberror=abi.KVM_INTERNAL_ERROR_EMULATION, ndata=2,
              flags=abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
              insn_size=2, insn_bytes=(ctypes.c_uint8 * 15)(0xD9, 0xEE, 0x90))
    assert e.instruction == b"\xd9\xee"


def test_no_instruction_without_its_flag_or_for_another_suberror():
    assert _exit(suberror=abi.KVM_INTERNAL_ERROR_EMULATION, insn_size=2).instruction is None
    assert _exit(suberror=abi.KVM_INTERNAL_ERROR_SIMUL_EX, insn_size=2,
                 flags=abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
                 ).instruction is None


def test_an_insn_size_beyond_the_array_is_cut_to_it():
    e = _exit(suberror=abi.KVM_INTERNAL_ERROR_EMULATION,
              flags=abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, insn_size=200)
    assert e.instruction == bytes(15)
