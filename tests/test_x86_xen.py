"""The Xen HVM and Hyper-V eventfd calls (issue 14): vm.set_xen_hvm_config,
vm.get_xen_hvm_attr/set_xen_hvm_attr, vm.inject_xen_evtchn, vcpu.get_xen_vcpu_attr/
set_xen_vcpu_attr, vm.add_hyperv_eventfd/remove_hyperv_eventfd.

Hosts without KVM_CAP_XEN_HVM or KVM_CAP_HYPERV_EVENTFD cannot run these ioctls, so most
tests make the VM report the capability and record each ioctl instead of issuing it, then
read the recorded struct's bytes back at the offsets the generated classes give (themselves
checked against gcc elsewhere): a swapped field, a wrong union member, a wrong ioctl number
or fd, or a missing capability check fails here. The last tests go to the real kernel.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re

import pytest

from kvm_bindings import KvmError, KvmUnsupported, SnapshotError, StaleHandleError, abi

XEN = abi.Capability.XEN_HVM
HYPERV = abi.Capability.HYPERV_EVENTFD
# Every feature bit these headers know: a "fully capable" kernel for the recording tests.
ALL_XEN = (abi.KVM_XEN_HVM_CONFIG_HYPERCALL_MSR | abi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL
           | abi.KVM_XEN_HVM_CONFIG_SHARED_INFO | abi.KVM_XEN_HVM_CONFIG_RUNSTATE
           | abi.KVM_XEN_HVM_CONFIG_EVTCHN_2LEVEL | abi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND
           | abi.KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG
           | abi.KVM_XEN_HVM_CONFIG_PVCLOCK_TSC_UNSTABLE | abi.KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA)


# ---- helpers -------------------------------------------------------------------------------

def _report(monkeypatch, vm, caps: dict[int, int]) -> None:
    """Make vm's kernel answer KVM_CHECK_EXTENSION with caps for these capabilities."""
    real = vm.check_extension
    monkeypatch.setattr(vm, "check_extension", lambda c: caps[c] if c in caps else real(c))


def _record(monkeypatch, *objs) -> list[list]:
    """Record (number, arg) of every ioctl on each object instead of issuing it."""
    logs: list[list] = []
    for obj in objs:
        log: list = []
        monkeypatch.setattr(obj, "ioctl", lambda number, arg=None, *, name=None, log=log:
                            log.append((number, arg)) or 0)
        logs.append(log)
    return logs


def _locate(cls, path: str) -> tuple[int, type]:
    """(offset, C type) of a dotted member path, walked through the generated classes'
    own _fields_ and descriptors (not the runtime's helpers)."""
    offset, t = 0, cls
    for part in path.split("."):
        offset += getattr(t, part).offset
        t = dict((f[0], f[1]) for f in t._fields_)[part]
    return offset, t


def _raw(arg) -> bytes:
    return ctypes.string_at(ctypes.addressof(arg), ctypes.sizeof(arg))


def _decode(raw: bytes, cls, paths: list[str]) -> dict[str, int]:
    """Each member's value read from raw at its generated offset; every other byte must be 0."""
    values, covered = {}, set()
    for path in paths:
        offset, t = _locate(cls, path)
        values[path] = t.from_buffer_copy(raw, offset).value
        covered |= set(range(offset, offset + ctypes.sizeof(t)))
    stray = [i for i, b in enumerate(raw) if b and i not in covered]
    assert not stray, f"bytes {stray} of the {cls.__name__} are set, outside {paths}"
    return values


def _sent(log, name: str):
    """The one ioctl in log: it must be abi.<name>, with an argument of its declared struct
    and size. Returns the argument."""
    assert len(log) == 1, log
    number, arg = log[0]
    io = abi.IOCTLS[name]
    assert number == getattr(abi, name) == io.number
    assert type(arg) is io.arg_type and ctypes.sizeof(arg) == io.size
    return arg


# ---- KVM_XEN_HVM_CONFIG --------------------------------------------------------------------

def test_xen_hvm_config_sends_each_field_at_its_offset_on_the_vm_fd(vm, vcpu, monkeypatch):
    _report(monkeypatch, vm, {XEN: ALL_XEN})
    vm_log, vcpu_log = _record(monkeypatch, vm, vcpu)
    # Distinct values, each filling its field's width, so a swap or a cut shows.
    vm.set_xen_hvm_config(flags=abi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND
                          | abi.KVM_XEN_HVM_CONFIG_PVCLOCK_TSC_UNSTABLE,
                          msr=0x40000123, blob_addr_32=0x1122334455667788,
                          blob_addr_64=0x8877665544332211, blob_size_32=0xA5, blob_size_64=0x5A)
    arg = _sent(vm_log, "KVM_XEN_HVM_CONFIG")
    assert vcpu_log == []
    fields = ["flags", "msr", "blob_addr_32", "blob_addr_64", "blob_size_32", "blob_size_64"]
    assert _decode(_raw(arg), abi.kvm_xen_hvm_config, fields) == {
        "flags": abi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND | abi.KVM_XEN_HVM_CONFIG_PVCLOCK_TSC_UNSTABLE,
        "msr": 0x40000123, "blob_addr_32": 0x1122334455667788,
        "blob_addr_64": 0x8877665544332211, "blob_size_32": 0xA5, "blob_size_64": 0x5A}


def test_xen_hvm_config_refuses_a_flag_the_capability_does_not_report_naming_it(vm, monkeypatch):
    _report(monkeypatch, vm, {XEN: abi.KVM_XEN_HVM_CONFIG_HYPERCALL_MSR
                              | abi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL})
    (log,) = _record(monkeypatch, vm)
    with pytest.raises(KvmUnsupported, match="KVM_CAP_XEN_HVM") as e:
        vm.set_xen_hvm_config(flags=abi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL
                              | abi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND)
    assert "KVM_XEN_HVM_CONFIG_EVTCHN_SEND" in str(e.value)
    assert "INTERCEPT_HCALL" not in str(e.value)       # reported: not what is missing
    with pytest.raises(KvmUnsupported, match="feature bit 0x80000000"):
        vm.set_xen_hvm_config(flags=1 << 31)             # a bit these headers do not name
    assert log == []
    vm.set_xen_hvm_config(flags=abi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL)   # a subset: sent
    assert _sent(log, "KVM_XEN_HVM_CONFIG").flags == abi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL


@pytest.mark.parametrize("blob", ["blob_addr_32", "blob_addr_64", "blob_size_32", "blob_size_64"])
def test_xen_hvm_config_with_intercepted_hypercalls_refuses_a_blob(vm, monkeypatch, blob):
    """api.rst: with KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL every blob field must be 0."""
    _report(monkeypatch, vm, {XEN: ALL_XEN})
    (log,) = _record(monkeypatch, vm)
    with pytest.raises(ValueError, match="INTERCEPT_HCALL"):
        vm.set_xen_hvm_config(flags=abi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL, **{blob: 1})
    assert log == []
    vm.set_xen_hvm_config(**{blob: 1})                  # without the flag, a blob is fine
    assert len(log) == 1


# ---- the capability gates, before any ioctl ------------------------------------------------

def _calls(vm, vcpu) -> dict[str, tuple]:
    """Each call, valid in itself, with the capability and feature bit it needs."""
    return {
        "set_xen_hvm_config": (lambda: vm.set_xen_hvm_config(msr=0x40000000), XEN, None),
        "get_xen_hvm_attr": (lambda: vm.get_xen_hvm_attr(abi.KVM_XEN_ATTR_TYPE_LONG_MODE),
                             XEN, "KVM_XEN_HVM_CONFIG_SHARED_INFO"),
        "set_xen_hvm_attr": (lambda: vm.set_xen_hvm_attr(abi.kvm_xen_hvm_attr()),
                             XEN, "KVM_XEN_HVM_CONFIG_SHARED_INFO"),
        "inject_xen_evtchn": (lambda: vm.inject_xen_evtchn(1, 0), XEN,
                              "KVM_XEN_HVM_CONFIG_EVTCHN_SEND"),
        "get_xen_vcpu_attr": (lambda: vcpu.get_xen_vcpu_attr(
            abi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO), XEN, "KVM_XEN_HVM_CONFIG_SHARED_INFO"),
        "set_xen_vcpu_attr": (lambda: vcpu.set_xen_vcpu_attr(abi.kvm_xen_vcpu_attr()),
                              XEN, "KVM_XEN_HVM_CONFIG_SHARED_INFO"),
        "add_hyperv_eventfd": (lambda: vm.add_hyperv_eventfd(1, 0), HYPERV, None),
        "remove_hyperv_eventfd": (lambda: vm.remove_hyperv_eventfd(1), HYPERV, None),
    }


CALLS = list(_calls(None, None))


@pytest.mark.parametrize("call", CALLS)
def test_without_the_capability_each_call_names_it_and_issues_nothing(vm, vcpu, monkeypatch, call):
    _report(monkeypatch, vm, {XEN: 0, HYPERV: 0})
    logs = _record(monkeypatch, vm, vcpu)
    run, cap, _ = _calls(vm, vcpu)[call]
    with pytest.raises(KvmUnsupported, match=f"KVM_CAP_{cap.name}") as e:
        run()
    assert e.value.capability.startswith(f"KVM_CAP_{cap.name}")
    assert logs == [[], []]


@pytest.mark.parametrize("call", [c for c in CALLS if _calls(None, None)[c][2]])
def test_with_xen_but_without_the_feature_bit_each_call_names_the_bit(vm, vcpu, monkeypatch, call):
    run, cap, feature = _calls(vm, vcpu)[call]
    # Everything but the one bit the call needs.
    _report(monkeypatch, vm, {XEN: ALL_XEN & ~getattr(abi, feature)})
    logs = _record(monkeypatch, vm, vcpu)
    with pytest.raises(KvmUnsupported, match="KVM_CAP_XEN_HVM") as e:
        run()
    assert feature in str(e.value)
    assert logs == [[], []]
    _report(monkeypatch, vm, {XEN: ALL_XEN})
    run()                                               # with the bit: it goes through
    assert sum(len(log) for log in logs) == 1


@pytest.mark.parametrize("attr_type, feature", [
    (abi.KVM_XEN_ATTR_TYPE_EVTCHN, "KVM_XEN_HVM_CONFIG_EVTCHN_SEND"),
    (abi.KVM_XEN_ATTR_TYPE_XEN_VERSION, "KVM_XEN_HVM_CONFIG_EVTCHN_SEND"),
    (abi.KVM_XEN_ATTR_TYPE_RUNSTATE_UPDATE_FLAG, "KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG"),
    (abi.KVM_XEN_ATTR_TYPE_SHARED_INFO_HVA, "KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA"),
])
def test_vm_attribute_types_added_later_need_their_own_feature_bit(vm, monkeypatch, attr_type,
                                                                   feature):
    (log,) = _record(monkeypatch, vm)
    _report(monkeypatch, vm, {XEN: ALL_XEN & ~getattr(abi, feature)})
    attr = abi.kvm_xen_hvm_attr(type=attr_type)
    for call in (lambda: vm.get_xen_hvm_attr(attr_type), lambda: vm.set_xen_hvm_attr(attr)):
        with pytest.raises(KvmUnsupported, match=feature):
            call()
    # ...and SHARED_INFO still, which the attribute ioctls themselves need.
    _report(monkeypatch, vm, {XEN: ALL_XEN & ~abi.KVM_XEN_HVM_CONFIG_SHARED_INFO})
    with pytest.raises(KvmUnsupported, match=re.escape("with KVM_XEN_HVM_CONFIG_SHARED_INFO)")):
        vm.set_xen_hvm_attr(attr)
    assert log == []
    _report(monkeypatch, vm, {XEN: ALL_XEN})
    vm.get_xen_hvm_attr(attr_type)
    vm.set_xen_hvm_attr(attr)
    assert [n for n, _ in log] == [abi.KVM_XEN_HVM_GET_ATTR, abi.KVM_XEN_HVM_SET_ATTR]


@pytest.mark.parametrize("attr_type, feature", [
    (abi.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADDR, "KVM_XEN_HVM_CONFIG_RUNSTATE"),
    (abi.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_DATA, "KVM_XEN_HVM_CONFIG_RUNSTATE"),
    (abi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_ID, "KVM_XEN_HVM_CONFIG_EVTCHN_SEND"),
    (abi.KVM_XEN_VCPU_ATTR_TYPE_TIMER, "KVM_XEN_HVM_CONFIG_EVTCHN_SEND"),
    (abi.KVM_XEN_VCPU_ATTR_TYPE_UPCALL_VECTOR, "KVM_XEN_HVM_CONFIG_EVTCHN_SEND"),
    (abi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO_HVA, "KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA"),
])
def test_vcpu_attribute_types_added_later_need_their_own_feature_bit(vm, vcpu, monkeypatch,
                                                                     attr_type, feature):
    (log,) = _record(monkeypatch, vcpu)
    _report(monkeypatch, vm, {XEN: ALL_XEN & ~getattr(abi, feature)})
    attr = abi.kvm_xen_vcpu_attr(type=attr_type)
    for call in (lambda: vcpu.get_xen_vcpu_attr(attr_type), lambda: vcpu.set_xen_vcpu_attr(attr)):
        # The one bit missing, not a longer name it begins (RUNSTATE_UPDATE_FLAG).
        with pytest.raises(KvmUnsupported, match=re.escape(f"KVM_CAP_XEN_HVM with {feature})")):
            call()
    _report(monkeypatch, vm, {XEN: ALL_XEN & ~abi.KVM_XEN_HVM_CONFIG_SHARED_INFO})
    with pytest.raises(KvmUnsupported, match=re.escape("with KVM_XEN_HVM_CONFIG_SHARED_INFO)")):
        vcpu.set_xen_vcpu_attr(attr)
    assert log == []
    _report(monkeypatch, vm, {XEN: ALL_XEN})
    vcpu.get_xen_vcpu_attr(attr_type)
    vcpu.set_xen_vcpu_attr(attr)
    assert [n for n, _ in log] == [abi.KVM_XEN_VCPU_GET_ATTR, abi.KVM_XEN_VCPU_SET_ATTR]


# ---- the attribute ioctls: struct, number, fd ----------------------------------------------

def test_get_xen_hvm_attr_asks_with_the_type_alone_and_returns_what_the_kernel_fills(
        vm, vcpu, monkeypatch):
    _report(monkeypatch, vm, {XEN: ALL_XEN})
    vm_log, vcpu_log = _record(monkeypatch, vm, vcpu)
    got = vm.get_xen_hvm_attr(abi.KVM_XEN_ATTR_TYPE_UPCALL_VECTOR)
    arg = _sent(vm_log, "KVM_XEN_HVM_GET_ATTR")
    assert vcpu_log == []
    assert got is arg              # the kernel writes the value into the struct it was given
    assert _decode(_raw(arg), abi.kvm_xen_hvm_attr, ["type"]) == {
        "type": abi.KVM_XEN_ATTR_TYPE_UPCALL_VECTOR}


def test_set_xen_hvm_attr_sends_the_callers_union_member_unchanged(vm, vcpu, monkeypatch):
    _report(monkeypatch, vm, {XEN: ALL_XEN})
    vm_log, vcpu_log = _record(monkeypatch, vm, vcpu)
    attr = abi.kvm_xen_hvm_attr(type=abi.KVM_XEN_ATTR_TYPE_EVTCHN)
    ev = attr.u.evtchn
    ev.send_port, ev.type, ev.flags = 0x11111111, abi.KVM_IRQ_ROUTING_XEN_EVTCHN, 0x33333333
    ev.deliver.port.port, ev.deliver.port.vcpu, ev.deliver.port.priority = 7, 0x5555, 0x6666
    vm.set_xen_hvm_attr(attr)
    arg = _sent(vm_log, "KVM_XEN_HVM_SET_ATTR")
    assert vcpu_log == [] and arg is attr
    paths = ["type", "u.evtchn.send_port", "u.evtchn.type", "u.evtchn.flags",
             "u.evtchn.deliver.port.port", "u.evtchn.deliver.port.vcpu",
             "u.evtchn.deliver.port.priority"]
    assert list(_decode(_raw(arg), abi.kvm_xen_hvm_attr, paths).values()) == [
        abi.KVM_XEN_ATTR_TYPE_EVTCHN, 0x11111111, abi.KVM_IRQ_ROUTING_XEN_EVTCHN, 0x33333333,
        7, 0x5555, 0x6666]
    # The union lies 8 bytes in (after type and pad[3]), as struct kvm_xen_hvm_attr says.
    assert _locate(abi.kvm_xen_hvm_attr, "u")[0] == 8


def test_set_xen_hvm_attr_long_mode_and_shared_info_share_the_union(vm, monkeypatch):
    _report(monkeypatch, vm, {XEN: ALL_XEN})
    (log,) = _record(monkeypatch, vm)
    vm.set_xen_hvm_attr(abi.kvm_xen_hvm_attr(type=abi.KVM_XEN_ATTR_TYPE_LONG_MODE,
                                             u=abi.kvm_xen_hvm_attr_u(long_mode=1)))
    attr = abi.kvm_xen_hvm_attr(type=abi.KVM_XEN_ATTR_TYPE_SHARED_INFO)
    attr.u.shared_info.gfn = 0xABCDE
    vm.set_xen_hvm_attr(attr)
    (_, long_mode), (_, shared) = log
    assert _decode(_raw(long_mode), abi.kvm_xen_hvm_attr, ["type", "u.long_mode"]) == {
        "type": abi.KVM_XEN_ATTR_TYPE_LONG_MODE, "u.long_mode": 1}
    assert _decode(_raw(shared), abi.kvm_xen_hvm_attr, ["type", "u.shared_info.gfn"]) == {
        "type": abi.KVM_XEN_ATTR_TYPE_SHARED_INFO, "u.shared_info.gfn": 0xABCDE}


def test_xen_vcpu_attrs_go_to_the_vcpu_fd_with_their_struct(vm, vcpu, monkeypatch):
    _report(monkeypatch, vm, {XEN: ALL_XEN})
    vm_log, vcpu_log = _record(monkeypatch, vm, vcpu)
    got = vcpu.get_xen_vcpu_attr(abi.KVM_XEN_VCPU_ATTR_TYPE_TIMER)
    arg = _sent(vcpu_log, "KVM_XEN_VCPU_GET_ATTR")
    assert got is arg and vm_log == []
    assert _decode(_raw(arg), abi.kvm_xen_vcpu_attr, ["type"]) == {
        "type": abi.KVM_XEN_VCPU_ATTR_TYPE_TIMER}
    vcpu_log.clear()
    attr = abi.kvm_xen_vcpu_attr(type=abi.KVM_XEN_VCPU_ATTR_TYPE_TIMER)
    attr.u.timer.port, attr.u.timer.priority = 3, abi.KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL
    attr.u.timer.expires_ns = 0x0123456789ABCDEF
    vcpu.set_xen_vcpu_attr(attr)
    arg = _sent(vcpu_log, "KVM_XEN_VCPU_SET_ATTR")
    assert arg is attr and vm_log == []
    assert list(_decode(_raw(arg), abi.kvm_xen_vcpu_attr,
                        ["type", "u.timer.port", "u.timer.priority", "u.timer.expires_ns"])
                .values()) == [abi.KVM_XEN_VCPU_ATTR_TYPE_TIMER, 3,
                               abi.KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL, 0x0123456789ABCDEF]


# ---- KVM_XEN_HVM_EVTCHN_SEND ---------------------------------------------------------------

def test_inject_xen_evtchn_sends_port_vcpu_and_priority(vm, vcpu, monkeypatch):
    _report(monkeypatch, vm, {XEN: ALL_XEN})
    vm_log, vcpu_log = _record(monkeypatch, vm, vcpu)
    vm.inject_xen_evtchn(0x1234, 0x56, priority=0x789)
    arg = _sent(vm_log, "KVM_XEN_HVM_EVTCHN_SEND")
    assert vcpu_log == []
    assert _decode(_raw(arg), abi.kvm_irq_routing_xen_evtchn, ["port", "vcpu", "priority"]) == {
        "port": 0x1234, "vcpu": 0x56, "priority": 0x789}
    vm_log.clear()
    vm.inject_xen_evtchn(5, 0)                 # the default: the one priority KVM delivers
    arg = _sent(vm_log, "KVM_XEN_HVM_EVTCHN_SEND")
    assert (arg.port, arg.vcpu, arg.priority) == (
        5, 0, abi.KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL)


# ---- KVM_HYPERV_EVENTFD --------------------------------------------------------------------

def test_add_hyperv_eventfd_sends_conn_id_and_fd_without_flags(vm, vcpu, monkeypatch):
    _report(monkeypatch, vm, {HYPERV: 1})
    vm_log, vcpu_log = _record(monkeypatch, vm, vcpu)
    vm.add_hyperv_eventfd(abi.KVM_HYPERV_CONN_ID_MASK, 0x7ABCDEF0)    # the largest conn_id
    arg = _sent(vm_log, "KVM_HYPERV_EVENTFD")
    assert vcpu_log == []
    assert _decode(_raw(arg), abi.kvm_hyperv_eventfd, ["conn_id", "fd", "flags"]) == {
        "conn_id": abi.KVM_HYPERV_CONN_ID_MASK, "fd": 0x7ABCDEF0, "flags": 0}


def test_remove_hyperv_eventfd_sends_deassign_for_the_conn_id(vm, monkeypatch):
    _report(monkeypatch, vm, {HYPERV: 1})
    (log,) = _record(monkeypatch, vm)
    vm.remove_hyperv_eventfd(0x123456)
    arg = _sent(log, "KVM_HYPERV_EVENTFD")
    assert _decode(_raw(arg), abi.kvm_hyperv_eventfd, ["conn_id", "fd", "flags"]) == {
        "conn_id": 0x123456, "fd": 0, "flags": abi.KVM_HYPERV_EVENTFD_DEASSIGN}


@pytest.mark.parametrize("call", ["add", "remove"])
def test_a_conn_id_wider_than_24_bits_is_a_value_error_before_any_ioctl(vm, monkeypatch, call):
    _report(monkeypatch, vm, {HYPERV: 1})
    (log,) = _record(monkeypatch, vm)
    too_wide = abi.KVM_HYPERV_CONN_ID_MASK + 1
    with pytest.raises(ValueError, match="KVM_HYPERV_CONN_ID_MASK"):
        if call == "add":
            vm.add_hyperv_eventfd(too_wide, 3)
        else:
            vm.remove_hyperv_eventfd(too_wide)
    assert log == []


# ---- misuse: wrong types, values that do not fit, closed objects ---------------------------

def _int_params(vm, vcpu) -> list[tuple[str, object]]:
    """(parameter, call taking a value for it): every integer the user hands these calls."""
    return [
        ("flags", lambda v: vm.set_xen_hvm_config(flags=v)),
        ("msr", lambda v: vm.set_xen_hvm_config(msr=v)),
        ("blob_addr_32", lambda v: vm.set_xen_hvm_config(blob_addr_32=v)),
        ("blob_addr_64", lambda v: vm.set_xen_hvm_config(blob_addr_64=v)),
        ("blob_size_32", lambda v: vm.set_xen_hvm_config(blob_size_32=v)),
        ("blob_size_64", lambda v: vm.set_xen_hvm_config(blob_size_64=v)),
        ("attr_type", lambda v: vm.get_xen_hvm_attr(v)),
        ("attr_type", lambda v: vcpu.get_xen_vcpu_attr(v)),
        ("port", lambda v: vm.inject_xen_evtchn(v, 0)),
        ("vcpu", lambda v: vm.inject_xen_evtchn(1, v)),
        ("priority", lambda v: vm.inject_xen_evtchn(1, 0, v)),
        ("conn_id", lambda v: vm.add_hyperv_eventfd(v, 3)),
        ("eventfd", lambda v: vm.add_hyperv_eventfd(1, v)),
        ("conn_id", lambda v: vm.remove_hyperv_eventfd(v)),
    ]


# The widest value each parameter's C field holds (from the generated types), plus one.
_TOO_WIDE = {"flags": 1 << 32, "msr": 1 << 32, "blob_addr_32": 1 << 64, "blob_addr_64": 1 << 64,
             "blob_size_32": 256, "blob_size_64": 256, "attr_type": 1 << 16, "port": 1 << 32,
             "vcpu": 1 << 32, "priority": 1 << 32, "conn_id": 1 << 32, "eventfd": 1 << 31}


def test_the_field_widths_the_misuse_table_assumes_are_the_generated_ones():
    widths = {"flags": (abi.kvm_xen_hvm_config, "flags"), "msr": (abi.kvm_xen_hvm_config, "msr"),
              "blob_addr_32": (abi.kvm_xen_hvm_config, "blob_addr_32"),
              "blob_size_32": (abi.kvm_xen_hvm_config, "blob_size_32"),
              "attr_type": (abi.kvm_xen_hvm_attr, "type"),
              "port": (abi.kvm_irq_routing_xen_evtchn, "port"),
              "conn_id": (abi.kvm_hyperv_eventfd, "conn_id"),
              "eventfd": (abi.kvm_hyperv_eventfd, "fd")}
    for name, (cls, field) in widths.items():
        t = _locate(cls, field)[1]
        signed = t(-1).value < 0
        assert _TOO_WIDE[name] == 1 << (ctypes.sizeof(t) * 8 - signed), name
    assert _locate(abi.kvm_xen_vcpu_attr, "type")[1] is ctypes.c_uint16


@pytest.mark.parametrize("bad", ["1", 1.0, True], ids=["str", "float", "bool"])
def test_a_non_integer_is_a_type_error_naming_the_parameter(vm, vcpu, monkeypatch, bad):
    _report(monkeypatch, vm, {XEN: ALL_XEN, HYPERV: 1})
    logs = _record(monkeypatch, vm, vcpu)
    for name, call in _int_params(vm, vcpu):
        with pytest.raises(TypeError, match=name):
            call(bad)
    assert logs == [[], []]


@pytest.mark.parametrize("which", ["negative", "too wide"])
def test_a_value_its_field_cannot_hold_is_an_overflow_error(vm, vcpu, monkeypatch, which):
    _report(monkeypatch, vm, {XEN: ALL_XEN, HYPERV: 1})
    logs = _record(monkeypatch, vm, vcpu)
    for name, call in _int_params(vm, vcpu):
        # eventfd is a signed int: its lowest value is -2**31, not -1.
        value = (-(1 << 31) - 1 if name == "eventfd" else -1) if which == "negative" \
            else _TOO_WIDE[name]
        with pytest.raises(OverflowError, match=name):
            call(value)
    assert logs == [[], []]


def test_the_attribute_setters_take_only_their_own_struct(vm, vcpu, monkeypatch):
    """Both structs are 72 bytes: only the type check tells them apart."""
    _report(monkeypatch, vm, {XEN: ALL_XEN})
    logs = _record(monkeypatch, vm, vcpu)
    for call, wrong in ((vm.set_xen_hvm_attr, abi.kvm_xen_vcpu_attr()),
                        (vcpu.set_xen_vcpu_attr, abi.kvm_xen_hvm_attr()),
                        (vm.set_xen_hvm_attr, None), (vcpu.set_xen_vcpu_attr, b"\0" * 72)):
        with pytest.raises(TypeError, match="kvm_xen_"):
            call(wrong)
    assert logs == [[], []]


def test_every_call_on_a_closed_vm_or_vcpu_is_refused(kvm):
    """Real objects, no capability faked: closed wins over whatever the kernel lacks."""
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.close()
    for call in ("get_xen_vcpu_attr", "set_xen_vcpu_attr"):
        with pytest.raises(StaleHandleError, match="closed"):
            _calls(vm, vcpu)[call][0]()
    vm.close()
    for call, _, _ in _calls(vm, vcpu).values():
        with pytest.raises(StaleHandleError, match="closed"):
            call()


# ---- the real kernel -----------------------------------------------------------------------

def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _round_trip(call: str, vm, vcpu) -> None:
    """What each call does on a kernel that has its capability (api.rst; the KVM selftests'
    xen_shinfo_test and hyperv_evtchn use the same arguments)."""
    xen = vm.check_extension(XEN)
    if call == "set_xen_hvm_config":
        # The guest's hypercall-page MSR; KVM builds the page itself where it can.
        flags = xen & abi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL
        vm.set_xen_hvm_config(flags=flags, msr=abi.KVM_XEN_MSR_MIN_INDEX)
    elif call in ("get_xen_hvm_attr", "set_xen_hvm_attr"):
        for mode in (1, 0, 1):          # each value read back, so a get that ignores set fails
            vm.set_xen_hvm_attr(abi.kvm_xen_hvm_attr(
                type=abi.KVM_XEN_ATTR_TYPE_LONG_MODE, u=abi.kvm_xen_hvm_attr_u(long_mode=mode)))
            assert vm.get_xen_hvm_attr(abi.KVM_XEN_ATTR_TYPE_LONG_MODE).u.long_mode == mode
    elif call in ("get_xen_vcpu_attr", "set_xen_vcpu_attr"):
        for gpa in (0x3000, 0x5040):    # vcpu_info: 64 bytes of guest memory (the vm has 64 KiB)
            attr = abi.kvm_xen_vcpu_attr(type=abi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO)
            attr.u.gpa = gpa
            vcpu.set_xen_vcpu_attr(attr)
            assert vcpu.get_xen_vcpu_attr(abi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO).u.gpa == gpa
    elif call == "inject_xen_evtchn":
        # A 64-bit guest's shared_info page at 0x4000 and its vCPU's vcpu_info at 0x3000;
        # a sent port shows as its bit in shared_info's evtchn_pending[] (Xen's public
        # xen.h: 32 vcpu_info of 64 bytes first, so evtchn_pending starts 0x800 in).
        vm.set_xen_hvm_attr(abi.kvm_xen_hvm_attr(
            type=abi.KVM_XEN_ATTR_TYPE_LONG_MODE, u=abi.kvm_xen_hvm_attr_u(long_mode=1)))
        shinfo = abi.kvm_xen_hvm_attr(type=abi.KVM_XEN_ATTR_TYPE_SHARED_INFO)
        shinfo.u.shared_info.gfn = 0x4000 >> 12
        vm.set_xen_hvm_attr(shinfo)
        info = abi.kvm_xen_vcpu_attr(type=abi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO)
        info.u.gpa = 0x3000
        vcpu.set_xen_vcpu_attr(info)
        vm.inject_xen_evtchn(5, vcpu.id)
        assert vm.memory.read_int(0x4000 + 0x800, 8) & (1 << 5)
    else:                               # add_/remove_hyperv_eventfd
        fd = _eventfd()
        try:
            vm.add_hyperv_eventfd(0x10, fd)
            with pytest.raises(KvmError) as again:      # registered: a second one is refused
                vm.add_hyperv_eventfd(0x10, fd)
            assert again.value.errno == errno.EEXIST
            vm.remove_hyperv_eventfd(0x10)
            with pytest.raises(KvmError) as gone:       # and removed: nothing left to remove
                vm.remove_hyperv_eventfd(0x10)
            assert gone.value.errno == errno.ENOENT
        finally:
            os.close(fd)


@pytest.mark.parametrize("call", CALLS)
def test_on_this_kernel_each_call_works_or_names_what_the_kernel_lacks(vm, vcpu, call):
    _, cap, feature = _calls(vm, vcpu)[call]
    value = vm.check_extension(cap)
    needed = getattr(abi, feature) if feature else 0
    if value and value & needed == needed:
        _round_trip(call, vm, vcpu)
        return
    with pytest.raises(KvmUnsupported, match=f"KVM_CAP_{cap.name}") as e:
        _calls(vm, vcpu)[call][0]()
    if value:                           # the capability, without the call's feature bit
        assert feature in str(e.value)


# ---- snapshots ----------------------------------------------------------------------------

@pytest.mark.parametrize("call, named", [
    (lambda vm, vcpu: vm.set_xen_hvm_config(flags=abi.KVM_XEN_HVM_CONFIG_SHARED_INFO),
     "set_xen_hvm_config()"),
    (lambda vm, vcpu: vm.set_xen_hvm_attr(abi.kvm_xen_hvm_attr(
        type=abi.KVM_XEN_ATTR_TYPE_LONG_MODE)), "set_xen_hvm_attr()"),
    (lambda vm, vcpu: vcpu.set_xen_vcpu_attr(abi.kvm_xen_vcpu_attr(
        type=abi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_ID)), "vcpu 0: set_xen_vcpu_attr()"),
    (lambda vm, vcpu: vm.add_hyperv_eventfd(0x42, 7), "add_hyperv_eventfd(0x42)"),
])
def test_a_snapshot_refuses_state_it_would_not_carry(vm, vcpu, monkeypatch, call, named):
    with monkeypatch.context() as m:        # the call as a kernel with the feature takes it
        _report(m, vm, {XEN: ALL_XEN, HYPERV: 1})
        _record(m, vm, vcpu)
        call(vm, vcpu)
    with pytest.raises(SnapshotError, match=re.escape(named)):
        vm.save_state()


def test_a_removed_hyperv_eventfd_no_longer_stops_a_snapshot(vm, vcpu, monkeypatch):
    with monkeypatch.context() as m:
        _report(m, vm, {HYPERV: 1})
        _record(m, vm)
        vm.add_hyperv_eventfd(0x42, 7)
        vm.add_hyperv_eventfd(0x43, 8)
        vm.remove_hyperv_eventfd(0x42)
    with pytest.raises(SnapshotError, match=r"add_hyperv_eventfd\(0x43\)") as e:
        vm.save_state()
    assert "0x42" not in str(e.value)
    with monkeypatch.context() as m:
        _report(m, vm, {HYPERV: 1})
        _record(m, vm)
        vm.remove_hyperv_eventfd(0x43)
    vm.save_state()
