"""Memory slots and GPA-addressed guest memory."""

from __future__ import annotations

import pytest

from kvm_bindings import GuestMemoryError, HltExit, abi
from kvm_bindings.memory import PAGE_SIZE


def test_dirty_log_lists_exactly_the_pages_the_guest_wrote(vm, real_mode):
    region = vm.memory.regions[0]
    vm.set_dirty_logging(region, True)
    vcpu = real_mode("dirty")
    vm.get_dirty_log(region)                   # forget the pages the test itself wrote
    assert isinstance(vcpu.run(), HltExit)
    assert list(vm.get_dirty_log(region)) == [0x3000, 0x5000, 0x9000]
    assert list(vm.get_dirty_log(region)) == []      # reading the log resets it
    assert vm.memory.read(0x5123, 1) == b"\x02"


def test_memory_reads_and_writes_span_adjacent_regions(vm):
    vm.add_memory(0x10000, 0x1000)
    vm.memory.write(0xFFFE, b"abcd")
    assert vm.memory.read(0xFFFC, 8) == b"\0\0abcd\0\0"
    assert vm.memory.regions[1].view()[:2].tobytes() == b"cd"


def test_gpa_outside_guest_memory_is_a_typed_error_that_writes_nothing(vm):
    with pytest.raises(GuestMemoryError, match=r"0x10000 is outside every memory region"):
        vm.memory.write(0xFFFF, b"xy")
    assert vm.memory.read(0xFFFF, 1) == b"\0"     # the in-range byte was not written
    with pytest.raises(GuestMemoryError):
        vm.memory.read(0x200000, 1)
    with pytest.raises(GuestMemoryError, match="spans"):
        vm.add_memory(0x10000, 0x1000)
        vm.memory.view(0xFFFF, 2)


def test_view_is_zero_copy(vm):
    view = vm.memory.view(0x2000, 4)
    view[:] = b"wxyz"
    assert vm.memory.read(0x2000, 4) == b"wxyz"
    assert vm.memory.host_address(0x2000) == vm.memory.regions[0].host_addr + 0x2000


def test_load_copies_a_file_into_guest_memory(vm, tmp_path):
    f = tmp_path / "image"
    f.write_bytes(b"\x90" * 100)
    assert vm.memory.load(0x4000, f) == 100
    assert vm.memory.read(0x4000, 100) == b"\x90" * 100


def test_overlapping_or_unaligned_regions_are_refused(vm):
    with pytest.raises(ValueError, match="overlaps"):
        vm.add_memory(0x8000, 0x10000)
    with pytest.raises(ValueError, match="page size"):
        vm.add_memory(0x20001, 0x1000)
    with pytest.raises(ValueError, match="page size"):
        vm.add_memory(0x20000, 100)


def test_removed_region_is_gone_for_the_guest_too(vm, real_mode):
    extra = vm.add_memory(0xD0000, 0x1000)
    vm.remove_memory(extra)
    assert extra not in vm.memory.regions
    with pytest.raises(GuestMemoryError):
        vm.memory.read(0xD0000, 1)
    vcpu = real_mode("mmio")                     # writes 0xd0010: an MMIO exit again
    assert vcpu.run().reason.name == "MMIO"


def test_moved_region_keeps_its_contents_at_the_new_address(vm):
    extra = vm.add_memory(0x20000, 0x1000)
    vm.memory.write(0x20010, b"kept")
    vm.move_memory(extra, 0x30000)
    assert vm.memory.read(0x30010, 4) == b"kept"
    with pytest.raises(GuestMemoryError):
        vm.memory.read(0x20010, 4)


def test_slots_are_allocated_and_reused(vm):
    a = vm.add_memory(0x20000, PAGE_SIZE)
    b = vm.add_memory(0x30000, PAGE_SIZE)
    assert (a.slot, b.slot) == (1, 2)
    vm.remove_memory(a)
    assert vm.add_memory(0x40000, PAGE_SIZE).slot == 1


def test_guest_memfd_backs_a_slot_where_the_kernel_has_it(kvm, assemble):
    from kvm_bindings import KvmUnsupported, x86
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        if not vm.check_extension(abi.Capability.GUEST_MEMFD):
            with pytest.raises(KvmUnsupported, match="KVM_CAP_GUEST_MEMFD"):
                vm.create_guest_memfd(0x10000)
            pytest.skip("this kernel has no guest_memfd for this VM type (raised KvmUnsupported)")
        fd = vm.create_guest_memfd(0x10000)
        region = vm.add_memory(0, 0x10000, guest_memfd=fd)
        assert region.flags & abi.KVM_MEM_GUEST_MEMFD
        assert region.guest_memfd == fd
        vm.memory.write(0x1000, assemble("dirty"))      # shared memory of the slot runs code
        vcpu = vm.create_vcpu(0)
        x86.setup_real_mode(vcpu, 0x1000)
        assert isinstance(vcpu.run(), HltExit)
        assert vm.memory.read(0x5123, 1) == b"\x02"


def test_dirty_ring_lists_the_pages_the_guest_wrote(kvm, assemble):
    from kvm_bindings import x86
    with kvm.create_vm() as vm:
        if not (vm.check_extension(abi.Capability.DIRTY_LOG_RING_ACQ_REL)
                or vm.check_extension(abi.Capability.DIRTY_LOG_RING)):
            pytest.skip("no dirty ring on this kernel")
        with pytest.raises(ValueError, match="power of two"):
            vm.enable_dirty_ring(100)
        vm.enable_dirty_ring(512)
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0x10000, log_dirty=True)
        vm.memory.write(0x1000, assemble("dirty"))
        vcpu = vm.create_vcpu(0)
        x86.setup_real_mode(vcpu, 0x1000)
        assert isinstance(vcpu.run(), HltExit)
        pages = vcpu.harvest_dirty_ring()
        assert {(0, 3), (0, 5), (0, 9)} <= set(pages)
        assert {off for slot, off in pages} <= {1, 3, 5, 9}   # the code page may be touched too
        vm.reset_dirty_rings()
        assert vcpu.harvest_dirty_ring() == []
