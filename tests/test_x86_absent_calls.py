"""The x86 calls this host's KVM cannot run (Hyper-V CPUID, SEV/TDX memory encryption):
what each would send, checked against the generated layouts, and the KvmUnsupported it
raises here. (Xen and the Hyper-V eventfd: tests/test_x86_xen.py.)"""

from __future__ import annotations

import ctypes
import errno

import pytest

from kvm_bindings import KvmError, KvmUnsupported, abi
from kvm_bindings._layout import capacity


def test_get_supported_hv_cpuid_asks_with_a_kvm_cpuid2_growing_until_it_fits(kvm, vm, monkeypatch):
    vcpu = vm.create_vcpu(0)
    for owner, call in ((kvm, kvm.get_supported_hv_cpuid), (vm, vcpu.get_supported_hv_cpuid)):
        target = vcpu if owner is vm else kvm
        monkeypatch.setattr(owner, "check_extension", lambda c: 1)
        asked = []

        def ioctl(number, arg, name=None, asked=asked):
            raw = ctypes.string_at(ctypes.addressof(arg), ctypes.sizeof(abi.kvm_cpuid2))
            nent = int.from_bytes(raw[abi.kvm_cpuid2.nent.offset:][:4], "little")
            asked.append((number, nent, capacity(arg)))       # the bytes the kernel may fill
            if nent < 40:                           # the kernel: E2BIG until there is room
                raise KvmError("KVM_GET_SUPPORTED_HV_CPUID", errno.E2BIG)
            return 0
        monkeypatch.setattr(target, "ioctl", ioctl)
        call()
        entry = ctypes.sizeof(abi.kvm_cpuid_entry2)
        assert [n for n, _, _ in asked] == [abi.KVM_GET_SUPPORTED_HV_CPUID] * len(asked)
        assert [nent for _, nent, _ in asked] == [16, 32, 64]
        assert [size for _, _, size in asked] == [ctypes.sizeof(abi.kvm_cpuid2) + n * entry
                                                  for n in (16, 32, 64)]


def test_get_supported_hv_cpuid_names_its_capability_here(kvm, vm):
    vcpu = vm.create_vcpu(0)
    for owner, call, cap in ((kvm, kvm.get_supported_hv_cpuid, "KVM_CAP_SYS_HYPERV_CPUID"),
                             (vm, vcpu.get_supported_hv_cpuid, "KVM_CAP_HYPERV_CPUID")):
        if owner.check_extension(getattr(abi.Capability, cap[8:])):
            assert call().nent > 0                  # another host: it answers
            continue
        with pytest.raises(KvmUnsupported, match=cap):
            call()


def test_an_encrypted_region_is_sent_as_the_regions_host_address_and_size(vm, monkeypatch):
    region = vm.add_memory(0x10000, 0x3000)
    sent = []
    monkeypatch.setattr(vm, "ioctl", lambda number, arg, name=None: sent.append(
        (number, ctypes.string_at(ctypes.addressof(arg), ctypes.sizeof(arg)))))
    vm.add_encrypted_region(region)
    vm.remove_encrypted_region(region)
    assert [n for n, _ in sent] == [abi.KVM_MEMORY_ENCRYPT_REG_REGION,
                                    abi.KVM_MEMORY_ENCRYPT_UNREG_REGION]
    for _, raw in sent:
        assert len(raw) == abi.IOCTLS["KVM_MEMORY_ENCRYPT_REG_REGION"].size
        addr = int.from_bytes(raw[abi.kvm_enc_region.addr.offset:][:8], "little")
        size = int.from_bytes(raw[abi.kvm_enc_region.size.offset:][:8], "little")
        assert (addr, size) == (region.host_addr, 0x3000)
        assert vm.memory.read(0x10000, 4) == ctypes.string_at(addr, 4)   # the guest's bytes


def test_memory_encrypt_op_sends_the_callers_command_struct_itself(vm, monkeypatch):
    sent = []
    monkeypatch.setattr(vm, "ioctl", lambda number, arg, name=None: sent.append((number, arg)))
    for cmd in (abi.kvm_sev_cmd(id=abi.KVM_SEV_INIT), abi.kvm_tdx_cmd(id=abi.KVM_TDX_INIT_VM)):
        vm.memory_encrypt_op(cmd)
        assert sent[-1][0] == abi.KVM_MEMORY_ENCRYPT_OP and sent[-1][1] is cmd
    assert abi.IOCTLS["KVM_MEMORY_ENCRYPT_OP"].size == ctypes.sizeof(ctypes.c_ulong)


def test_without_sev_or_tdx_the_encryption_calls_raise_kvm_unsupported(kvm, vm):
    if kvm.vm_types() & ~1:
        pytest.skip("this host offers a confidential VM type: tests/test_parity.py runs it")
    region = vm.add_memory(0x10000, 0x1000)
    for call in (lambda: vm.memory_encrypt_op(abi.kvm_sev_cmd(id=abi.KVM_SEV_INIT)),
                 lambda: vm.add_encrypted_region(region),
                 lambda: vm.remove_encrypted_region(region)):
        with pytest.raises(KvmUnsupported, match="memory encryption") as e:
            call()
        assert e.value.errno == errno.EOPNOTSUPP
