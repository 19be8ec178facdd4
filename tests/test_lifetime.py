"""Errors people can act on, and objects that own their fds."""

from __future__ import annotations

import errno
import gc
import os
import warnings

import pytest

from kvm_bindings import Kvm, KvmError, KvmUnavailable, KvmUnsupported, abi


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_missing_dev_kvm_is_kvm_unavailable_with_a_hint(tmp_path):
    with pytest.raises(KvmUnavailable) as err:
        Kvm(str(tmp_path / "no-kvm"))
    assert err.value.errno == errno.ENOENT and "modprobe" in str(err.value)
    assert isinstance(err.value, OSError)


@pytest.mark.parametrize("kind", ["regular file", "fifo", "/dev/null"])
def test_a_path_that_is_not_kvm_is_kvm_unavailable_without_leaking(tmp_path, kind):
    path = tmp_path / "not-kvm"
    if kind == "regular file":
        path.write_bytes(b"")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path = "/dev/null"
    before = _open_fds()
    with pytest.raises(KvmUnavailable, match="not a character device|not a KVM device") as err:
        Kvm(str(path))
    assert err.value.errno == errno.ENODEV and str(path) in str(err.value)
    assert _open_fds() == before


def test_kvm_error_names_the_ioctl_and_errno(vm):
    with pytest.raises(KvmError) as err:
        vm.get_irqchip(0)                    # no irqchip was created
    assert err.value.ioctl == "KVM_GET_IRQCHIP" and err.value.errno == errno.ENXIO
    assert "KVM_GET_IRQCHIP" in str(err.value)


def test_a_missing_capability_is_kvm_unsupported_naming_it(kvm):
    with kvm.create_vm() as vm:
        vm._caps[int(abi.Capability.IRQCHIP)] = 0     # as on a kernel without it
        with pytest.raises(KvmUnsupported, match="KVM_CAP_IRQCHIP") as err:
            vm.create_irqchip()
        assert err.value.capability == "KVM_CAP_IRQCHIP"


def test_closed_objects_refuse_use_with_value_error(kvm):
    vm = kvm.create_vm()
    vm.add_memory(0, 0x1000)
    vcpu = vm.create_vcpu(0)
    vm.close()
    assert vcpu.closed                      # the VM closed its vCPU
    for call in (vcpu.run, vcpu.get_regs, vm.create_irqchip, lambda: vm.create_vcpu(1), vcpu.kick):
        with pytest.raises(ValueError, match="closed"):
            call()
    vm.close()                              # closing twice is fine


def test_everything_a_vm_opened_is_closed_with_it(kvm):
    before = _open_fds()
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0x10000)
        vm.create_irqchip()
        vm.create_vcpu(0)
        vm.create_vcpu(1)
        assert len(_open_fds()) > len(before)
    assert _open_fds() == before


def test_an_unclosed_vm_warns_like_a_file_and_releases_its_fd(kvm):
    before = _open_fds()
    vm = kvm.create_vm()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del vm
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    assert _open_fds() == before


def test_an_exit_view_outlives_its_vcpu_safely(vm, real_mode):
    vcpu = real_mode("port_io")
    e = vcpu.run()
    vcpu.close()                              # the kvm_run page stays while the view lives
    assert bytes(e.data) == b"H"


def test_a_region_view_outlives_removal_safely(vm):
    region = vm.add_memory(0x20000, 0x1000)
    view = vm.memory.view(0x20000, 4)
    vm.remove_memory(region)
    view[:] = b"safe"                         # the mapping lives until the view goes
    assert bytes(view) == b"safe"


def test_a_vm_keeps_working_after_its_kvm_is_closed(assemble):
    """The kernel keeps a VM alive through its own fd; so do the bindings."""
    from kvm_bindings import HltExit, x86
    kvm = Kvm()
    vm = kvm.create_vm()
    kvm.close()
    with vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0x10000)
        vm.memory.write(0x1000, assemble("hlt"))
        vcpu = vm.create_vcpu(0)
        x86.setup_real_mode(vcpu, 0x1000)
        assert isinstance(vcpu.run(), HltExit)
