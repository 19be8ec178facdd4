"""Interrupt delivery and the exit-less paths: irqfd, ioeventfd, coalesced MMIO."""

from __future__ import annotations

import os

import pytest

from kvm_bindings import HltExit, IoExit, MmioExit


@pytest.fixture
def eventfd():
    fds = []

    def make(flags: int = os.EFD_NONBLOCK) -> int:
        fds.append(os.eventfd(0, flags))
        return fds[-1]
    yield make
    for fd in fds:
        os.close(fd)


def test_irqfd_delivers_an_interrupt_to_the_guest_handler(vm, assemble, eventfd):
    from kvm_bindings import x86
    vm.create_irqchip()                       # before any vCPU exists
    vm.memory.write(0x1000, assemble("irq"))
    vcpu = vm.create_vcpu(0)
    x86.setup_real_mode(vcpu, 0x1000, stack=0x8000)
    efd = eventfd()
    vm.add_irqfd(efd, 5)

    ready = vcpu.run()
    assert isinstance(ready, IoExit) and ready.port == 0x3F8
    os.eventfd_write(efd, 1)                  # raise IRQ 5 through the irqfd
    handled = vcpu.run()                      # the guest sleeps in hlt until the interrupt
    assert isinstance(handled, IoExit) and handled.port == 0x3F9 and bytes(handled.data) == b"\x25"
    vm.remove_irqfd(efd, 5)


def test_irq_line_injects_through_the_in_kernel_pic(vm, assemble):
    from kvm_bindings import x86
    vm.create_irqchip()
    vm.memory.write(0x1000, assemble("irq"))
    vcpu = vm.create_vcpu(0)
    x86.setup_real_mode(vcpu, 0x1000, stack=0x8000)
    assert vcpu.run().port == 0x3F8
    vm.set_irq_line(5, 1)
    vm.set_irq_line(5, 0)                         # an edge
    handled = vcpu.run()
    assert handled.port == 0x3F9


def test_ioeventfd_counts_guest_writes_without_exits(vm, real_mode, eventfd):
    pio, matched = eventfd(), eventfd()
    vm.add_ioeventfd(pio, 0x500, 1, pio=True)
    vm.add_ioeventfd(matched, 0xD0000, 2, datamatch=0x1234)
    vcpu = real_mode("ioeventfd")
    e = vcpu.run()                            # the five port writes and the matched MMIO write: no exits
    assert isinstance(e, MmioExit) and bytes(e.data) == (0x9999).to_bytes(2, "little")
    assert os.eventfd_read(pio) == 5
    assert os.eventfd_read(matched) == 1
    assert vcpu.run().port == 0x3F8
    assert isinstance(vcpu.run(), HltExit)
    vm.remove_ioeventfd(pio, 0x500, 1, pio=True)


def test_coalesced_mmio_and_pio_ring_holds_the_writes_in_order(vm, real_mode):
    vm.add_coalesced_mmio(0xE0000, 0x1000)
    vm.add_coalesced_mmio(0x600, 1, pio=True)
    vcpu = real_mode("coalesced")
    e = vcpu.run()
    assert isinstance(e, IoExit) and e.port == 0x3F8    # no MMIO exits before this one
    assert vcpu.drain_coalesced_mmio() == [
        (0xE0000, b"\x11", False),
        (0xE0010, b"\x22\x22", False),
        (0xE0020, b"\x33\x33\x33\x33", False),
        (0x600, b"\x44", True),
    ]
    assert vcpu.drain_coalesced_mmio() == []          # drained
    vm.remove_coalesced_mmio(0xE0000, 0x1000)


def test_irqchip_state_round_trips(vm):
    """What KVM_SET_IRQCHIP writes, KVM_GET_IRQCHIP reads back: both PICs and the IOAPIC."""
    from kvm_bindings import abi
    vm.create_irqchip()

    def flip_imr(chip):
        chip.pic.imr ^= 0xA5                  # mask some lines, unmask others

    def route_pin_3(chip):
        pin = chip.ioapic.redirtbl[3].fields
        pin.vector, pin.mask = 0x42, 0        # unmasked (reset: masked), to vector 0x42
    for chip_id, change in ((abi.KVM_IRQCHIP_PIC_MASTER, flip_imr),
                            (abi.KVM_IRQCHIP_PIC_SLAVE, flip_imr),
                            (abi.KVM_IRQCHIP_IOAPIC, route_pin_3)):
        fresh, wanted = vm.get_irqchip(chip_id), vm.get_irqchip(chip_id)
        change(wanted.chip)
        assert bytes(wanted) != bytes(fresh)
        vm.set_irqchip(wanted)
        assert bytes(vm.get_irqchip(chip_id)) == bytes(wanted), chip_id


def test_pit2_state_round_trips(vm):
    vm.create_irqchip()
    vm.create_pit2()
    pit = vm.get_pit2()
    speaker = pit.channels[2]                 # channel 2: no interrupt to fire while we look
    assert (speaker.count, speaker.mode) != (0x1234, 3)
    speaker.count, speaker.mode = 0x1234, 3   # a square wave of 1193182 / 0x1234 Hz
    vm.set_pit2(pit)
    got = vm.get_pit2()
    # (count_load_time is re-stamped by the load, so whole structs are not compared)
    assert [(c.count, c.mode, c.gate) for c in got.channels] == \
        [(c.count, c.mode, c.gate) for c in pit.channels]


def test_resampling_irqfd_signals_when_the_guest_acknowledges(vm, assemble, eventfd):
    """A level interrupt through an irqfd with resample: the guest's EOI lowers the line and
    writes the resample eventfd, so a device model knows to re-check its state."""
    from kvm_bindings import x86
    vm.create_irqchip()
    vm.memory.write(0x1000, assemble("irq_level"))
    vcpu = vm.create_vcpu(0)
    x86.setup_real_mode(vcpu, 0x1000, stack=0x8000)
    trigger, resample = eventfd(), eventfd()
    vm.add_irqfd(trigger, 5, resample_fd=resample)

    assert vcpu.run().port == 0x3F8             # programmed the PIC, about to wait
    os.eventfd_write(trigger, 1)                # raise the level interrupt
    handled = vcpu.run()
    assert handled.port == 0x3F9                # the handler ran; no EOI yet
    with pytest.raises(BlockingIOError):
        os.eventfd_read(resample)
    assert vcpu.run().port == 0x3FA             # past the EOI
    assert os.eventfd_read(resample) == 1
