"""File descriptors: fileno(), adopting fds made elsewhere (from_fd), O_CLOEXEC, and no leaks.

Ownership, as the docstrings state it: an object made by from_fd() owns the fd from then
on and closes it; when from_fd() refuses an fd it has not taken it, and the caller's fd
stays open. KVM answers a VM's (vCPU's, device's) ioctls only in the process that created
the VM, so across processes it is /dev/kvm that is handed over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import pytest

from kvm_bindings import KvmError, KvmUnavailable, StaleHandleError, abi, x86
from kvm_bindings.device import Device
from kvm_bindings.exits import HltExit
from kvm_bindings.vcpu import Vcpu

from .conftest import LOAD_ADDR, ROOT


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


def cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def name_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def run_hlt(vm, assemble, vcpu=None) -> object:
    """Load the one-instruction hlt guest in vm's memory at LOAD_ADDR and run it once."""
    vm.memory.write(LOAD_ADDR, assemble("hlt"))
    vcpu = vcpu or vm.create_vcpu(0)
    x86.setup_real_mode(vcpu, LOAD_ADDR)
    return vcpu.run()


# ---- fileno() on every kind of fd object --------------------------------------------

def _kinds() -> dict[str, Callable]:
    """kind -> make(kvm, vm) returning a fresh object of that kind, and its /proc name."""
    return {
        "Kvm": lambda kvm, vm: (type(kvm)(), "/dev/kvm"),
        "Vm": lambda kvm, vm: (kvm.create_vm(), "anon_inode:kvm-vm"),
        "Vcpu": lambda kvm, vm: (vm.create_vcpu(0), "anon_inode:kvm-vcpu:0"),
        "Device": lambda kvm, vm: (vm.create_device(abi.KVM_DEV_TYPE_VFIO), "anon_inode:kvm-vfio"),
        "Stats (VM)": lambda kvm, vm: (vm.open_stats(), "anon_inode:kvm-vm-stats"),
        "Stats (vCPU)": lambda kvm, vm: (vm.create_vcpu(1).open_stats(),
                                         "anon_inode:kvm-vcpu-stats:1"),
        "GuestMemfd": lambda kvm, vm: (vm.create_guest_memfd(0x10000), "anon_inode:[kvm-gmem]"),
    }


@pytest.fixture(params=list(_kinds()))
def fd_object(request, kvm) -> Iterator[tuple[object, str]]:
    """(a live fd object of each kind, what /proc calls its file); all closed afterwards."""
    with kvm.create_vm() as vm:
        try:
            obj, name = _kinds()[request.param](kvm, vm)
        except KvmError as e:
            # Only a capability this host lacks may stop a kind here, and it says which.
            assert e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV), e
            pytest.skip(f"{request.param} cannot be made on this host: {e}")
        yield obj, name
        obj.close()


def test_fileno_is_the_objects_fd(fd_object) -> None:
    obj, name = fd_object
    assert obj.fileno() == obj.fd
    assert name_of(obj.fileno()) == name        # the file this object is, not just any fd


def test_fileno_refuses_a_closed_object_like_fd(fd_object) -> None:
    obj, name = fd_object
    fd = obj.fileno()
    obj.close()
    with pytest.raises(StaleHandleError, match="closed"):
        obj.fileno()
    with pytest.raises(StaleHandleError):
        obj.fd    # noqa: B018
    assert not is_open(fd) or name_of(fd) != name    # the file is let go, not just hidden


def test_fileno_lets_select_wait_on_a_kvm_object(kvm) -> None:
    import select
    with kvm.create_vm() as vm:
        stats = vm.open_stats()
        readable, _, _ = select.select([stats], [], [], 0)   # select calls fileno()
        assert readable == [stats]


# ---- O_CLOEXEC --------------------------------------------------------------------

def test_kvm_is_opened_close_on_exec_by_default(kvm) -> None:
    assert cloexec(kvm.fileno())


def test_kvm_cloexec_false_opens_without_close_on_exec(kvm) -> None:
    with type(kvm)(cloexec=False) as inherited:
        assert not cloexec(inherited.fileno())
        assert os.get_inheritable(inherited.fileno())


_PROBE = """
import ctypes, os, sys
from kvm_bindings import abi
fd = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
try:
    os.fstat(fd)
except OSError:
    print("closed")
else:
    print("api", libc.ioctl(fd, abi.KVM_GET_API_VERSION, 0))
"""


def _exec_and_probe(fd: int) -> str:
    """Exec a new program (no fds closed for it) and ask whether fd is /dev/kvm there."""
    return subprocess.run([sys.executable, "-c", _PROBE, str(fd)], close_fds=False, check=True,
                          capture_output=True, text=True, cwd=ROOT, timeout=60).stdout.strip()


@pytest.mark.parametrize("inherit", [False, True])
def test_cloexec_decides_whether_an_exec_ed_program_gets_kvm(kvm, inherit) -> None:
    with type(kvm)(cloexec=not inherit) as k:
        seen = _exec_and_probe(k.fileno())
    assert seen == (f"api {abi.KVM_API_VERSION}" if inherit else "closed")


@pytest.mark.parametrize("kind", ["Vm", "Vcpu", "Device", "Stats (VM)", "Stats (vCPU)",
                                  "GuestMemfd"])
def test_fds_the_kernel_makes_are_close_on_exec(kvm, kind) -> None:
    with kvm.create_vm() as vm:
        try:
            obj, _ = _kinds()[kind](kvm, vm)
        except KvmError as e:
            pytest.skip(f"{kind} cannot be made on this host: {e}")
        assert cloexec(obj.fileno())


# ---- adopting a /dev/kvm fd ---------------------------------------------------------

def test_kvm_from_fd_owns_the_fd_it_adopts(kvm, assemble) -> None:
    fd = os.dup(kvm.fileno())
    adopted = type(kvm).from_fd(fd)
    assert isinstance(adopted, type(kvm)) and adopted.fileno() == fd
    assert adopted.api_version == abi.KVM_API_VERSION
    with adopted.create_vm() as vm:           # a working /dev/kvm, not just an open fd
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0x10000)
        assert isinstance(run_hlt(vm, assemble), HltExit)
    adopted.close()
    assert not is_open(fd)                    # closed by the object that owned it
    assert kvm.check_extension(abi.Capability.USER_MEMORY)    # the original is untouched


def _not_kvm_fds(kvm) -> Iterator[tuple[str, int, list[int]]]:
    """(what, fd, fds to close afterwards) for fds that are not /dev/kvm."""
    null = os.open("/dev/null", os.O_RDWR)
    yield "/dev/null", null, [null]
    r, w = os.pipe()
    yield "a pipe", r, [r, w]
    f = tempfile.TemporaryFile()
    yield "a regular file", f.fileno(), []
    f.close()
    with kvm.create_vm() as vm:
        yield "a VM fd", vm.fileno(), []


def test_kvm_from_fd_refuses_what_is_not_kvm_and_leaves_the_fd_open(kvm) -> None:
    refused = []
    for what, fd, to_close in _not_kvm_fds(kvm):
        before = open_fds()
        with pytest.raises(KvmUnavailable, match="not a KVM device|not a character device"):
            type(kvm).from_fd(fd)
        assert is_open(fd), f"from_fd closed the caller's {what}"
        assert open_fds() == before, f"refusing {what} opened or closed an fd"
        refused.append(what)
        for f in to_close:
            os.close(f)
    assert refused == ["/dev/null", "a pipe", "a regular file", "a VM fd"]


def test_kvm_from_fd_of_a_closed_fd_is_the_oses_ebadf(kvm) -> None:
    fd = os.dup(kvm.fileno())
    os.close(fd)
    with pytest.raises(OSError) as e:
        type(kvm).from_fd(fd)
    assert e.value.errno == errno.EBADF


# ---- handing /dev/kvm and a VM to another process over a unix socket -----------------

_RECEIVER = """
import json, os, socket, sys
from kvm_bindings import Kvm, KvmError, Vm, x86
from kvm_bindings.exits import HltExit

sock = socket.socket(fileno=int(sys.argv[1]))
guest = bytes.fromhex(sys.argv[2])
_, (kvm_fd, vm_fd), _, _ = socket.recv_fds(sock, 16, 2)
report = {}
with Kvm.from_fd(kvm_fd) as kvm:              # a /dev/kvm fd works in any process
    report["api"] = kvm.api_version
    with kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0x10000)
        vm.memory.write(0x1000, guest)
        vcpu = vm.create_vcpu(0)
        x86.setup_real_mode(vcpu, 0x1000)
        exit = vcpu.run()
        report["exit"] = type(exit).__name__
        report["rip"] = vcpu.get_regs().rip
    try:                                      # a VM fd only in the process that created it
        Vm.from_fd(kvm, vm_fd)
        report["vm"] = "adopted"
    except KvmError as e:
        report["vm"] = [e.errno, str(e)]
    report["vm_fd_still_open"] = os.fstat(vm_fd) is not None
report["kvm_fd_closed"] = not os.path.exists(f"/proc/self/fd/{kvm_fd}")
print(json.dumps(report))
"""


def test_kvm_fd_sent_over_a_unix_socket_runs_a_guest_in_the_receiver(kvm, assemble) -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent, child, kvm.create_vm() as vm:
        proc = subprocess.Popen(
            [sys.executable, "-c", _RECEIVER, str(child.fileno()), assemble("hlt").hex()],
            pass_fds=[child.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=ROOT)
        socket.send_fds(parent, [b"fds"], [kvm.fileno(), vm.fileno()])
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert vm.check_extension(abi.Capability.USER_MEMORY)   # ours is still ours
    report = json.loads(out)
    assert report["api"] == abi.KVM_API_VERSION
    assert report["exit"] == "HltExit" and report["rip"] == LOAD_ADDR + 1   # ran past the hlt
    assert report["vm"][0] == errno.EIO and "another process" in report["vm"][1]
    assert report["vm_fd_still_open"]         # refused: the receiver's fd stays its own
    assert report["kvm_fd_closed"]            # adopted: closed with the Kvm


# ---- adopting VM, vCPU and device fds made elsewhere in this process ---------------

def _send_to_self(fd: int) -> int:
    """fd as received over a unix socket (SCM_RIGHTS): a new descriptor of the same file."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        socket.send_fds(a, [b"x"], [fd])
        _, (received,), _, _ = socket.recv_fds(b, 1, 1)
    return received


def test_vm_from_fd_adopts_a_vm_and_runs_it(kvm, assemble) -> None:
    with kvm.create_vm() as original:
        original.set_tss_addr(0xFFFBD000)
        original.add_memory(0, 0x4000)
        fd = _send_to_self(original.fileno())
        vm = type(original).from_fd(kvm, fd)
        assert type(vm) is type(original) and vm.fileno() == fd
        assert vm.memory.regions == ()           # the sender's slots are not known here
        vm.add_memory(0x4000, 0xC000, slot=1)    # so the slot is chosen by the caller
        vm.memory.write(LOAD_ADDR + 0x4000, assemble("hlt", LOAD_ADDR + 0x4000))
        vcpu = vm.create_vcpu(0)
        x86.setup_real_mode(vcpu, LOAD_ADDR + 0x4000)
        assert isinstance(vcpu.run(), HltExit)
        vm.close()
        assert not is_open(fd)
        assert original.check_extension(abi.Capability.USER_MEMORY)


def test_vm_from_fd_refuses_what_is_not_a_vm_and_leaves_the_fd_open(kvm) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        null = os.open("/dev/null", os.O_RDONLY)
        try:
            for fd in (null, kvm.fileno(), vcpu.fileno()):
                before = open_fds()
                with pytest.raises(ValueError, match="not a KVM VM fd"):
                    type(vm).from_fd(kvm, fd)
                assert is_open(fd) and open_fds() == before
        finally:
            os.close(null)


def test_vm_from_fd_with_a_closed_kvm_takes_nothing(kvm) -> None:
    k = type(kvm)()
    k.close()
    with kvm.create_vm() as vm:
        fd = os.dup(vm.fileno())
        with pytest.raises(StaleHandleError):
            type(vm).from_fd(k, fd)
        assert is_open(fd)
        os.close(fd)


def test_vcpu_from_fd_maps_kvm_run_from_the_adopted_fd(vm, assemble) -> None:
    vm.memory.write(LOAD_ADDR, assemble("hlt"))
    made = vm.create_vcpu(3)
    adopted_vm = type(vm).from_fd(vm.kvm, os.dup(vm.fileno()))
    try:
        fd = os.dup(made.fileno())
        vcpu = Vcpu.from_fd(adopted_vm, fd)         # the id comes from the fd's name
        assert type(vcpu) is type(made) and vcpu.id == 3 and vcpu.fileno() == fd
        assert adopted_vm.vcpus == (vcpu,)
        x86.setup_real_mode(vcpu, LOAD_ADDR)
        exit = vcpu.run()
        assert isinstance(exit, HltExit)
        assert vcpu.kvm_run.exit_reason == abi.ExitReason.HLT       # its own kvm_run page
        assert made.kvm_run.exit_reason == abi.ExitReason.HLT       # the same vCPU's page
    finally:
        adopted_vm.close()
    assert not is_open(fd)                            # closed with the VM that owned it
    assert made.get_regs().rip == LOAD_ADDR + 1       # the original handle still works


def test_vcpu_from_fd_refusals_leave_the_fd_open(vm) -> None:
    made = vm.create_vcpu(0)
    other = type(vm).from_fd(vm.kvm, os.dup(vm.fileno()))
    try:
        for fd, vcpu_id, message in [(vm.fileno(), None, "not a KVM vCPU fd"),
                                     (made.fileno(), 1, "is vCPU 0, not vCPU 1")]:
            before = open_fds()
            with pytest.raises(ValueError, match=message):
                Vcpu.from_fd(other, fd, vcpu_id)
            assert is_open(fd) and open_fds() == before
        Vcpu.from_fd(other, os.dup(made.fileno()))
        again = os.dup(made.fileno())
        with pytest.raises(ValueError, match="already has an open Vcpu"):
            Vcpu.from_fd(other, again)
        assert is_open(again)
        os.close(again)
    finally:
        other.close()


def test_device_from_fd_is_closed_with_its_vm(vm) -> None:
    made = vm.create_device(abi.KVM_DEV_TYPE_VFIO)
    fd = os.dup(made.fileno())
    dev = Device.from_fd(vm, fd, abi.KVM_DEV_TYPE_VFIO)
    assert dev.fileno() == fd and dev.device_type == abi.KVM_DEV_TYPE_VFIO
    assert dev.has_attr(abi.KVM_DEV_VFIO_FILE, abi.KVM_DEV_VFIO_FILE_ADD) == \
        made.has_attr(abi.KVM_DEV_VFIO_FILE, abi.KVM_DEV_VFIO_FILE_ADD)
    with pytest.raises(ValueError, match="not a KVM device fd"):
        Device.from_fd(vm, vm.fileno(), abi.KVM_DEV_TYPE_VFIO)
    vm.close()
    assert dev.closed and not is_open(fd)


# ---- fd accounting ------------------------------------------------------------------

def test_every_path_through_from_fd_leaves_no_fd_behind(kvm, assemble) -> None:
    before = open_fds()
    for _ in range(3):
        k = type(kvm).from_fd(os.dup(kvm.fileno()))
        with k.create_vm() as vm:
            vm.set_tss_addr(0xFFFBD000)
            vm.add_memory(0, 0x10000)
            adopted = type(vm).from_fd(k, os.dup(vm.fileno()))
            vcpu = vm.create_vcpu(0)
            Vcpu.from_fd(adopted, os.dup(vcpu.fileno()))
            Device.from_fd(adopted, os.dup(vm.create_device(abi.KVM_DEV_TYPE_VFIO).fileno()),
                           abi.KVM_DEV_TYPE_VFIO)
            adopted.open_stats()
            null = os.open("/dev/null", os.O_RDONLY)
            with pytest.raises(KvmUnavailable):
                type(kvm).from_fd(null)
            with pytest.raises(ValueError):
                type(vm).from_fd(k, null)
            os.close(null)
            assert isinstance(run_hlt(vm, assemble, vcpu), HltExit)
            adopted.close()
        k.close()
    assert open_fds() == before


# ---- what an adversarial pass found --------------------------------------------------

def test_from_fd_refuses_an_fd_a_live_object_owns(kvm) -> None:
    # Both objects would close it: the second close would hit whatever file reused the number
    # (vmA.close() then closed vmB's fd and deleted vmB's slot).
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0x1000)
        dev = vm.create_device(abi.KVM_DEV_TYPE_VFIO)
        other = vm.create_vcpu(0)
        for adopt in (lambda: type(kvm).from_fd(kvm.fileno()),
                      lambda: type(vm).from_fd(kvm, vm.fileno()),
                      lambda: Device.from_fd(vm, dev.fileno(), abi.KVM_DEV_TYPE_VFIO)):
            with pytest.raises(ValueError, match="is owned by"):
                adopt()
        with pytest.raises(ValueError, match="is owned by|already has an open Vcpu"):
            Vcpu.from_fd(vm, other.fileno())
        # Nothing was taken: every owner still works, and still owns its fd.
        kvm.create_vm().close()
        assert vm.memory.regions and vm.vcpus == (other,)
        dev.has_attr(abi.KVM_DEV_VFIO_FILE, abi.KVM_DEV_VFIO_FILE_ADD)
        assert all(is_open(fd) for fd in (kvm.fileno(), vm.fileno(), dev.fileno(),
                                          other.fileno()))



def _close_in_another_thread_when_called(vm, real):
    """A stand-in for `real` that first starts vm.close() in another thread and waits until
    it has begun (the VM refuses new work), then does what real does."""
    import threading
    import time
    closer: list[threading.Thread] = []

    def stand_in(*args, **kwargs):
        if not closer:
            closer.append(threading.Thread(target=vm.close))
            closer[0].start()
            deadline = time.monotonic() + 5
            while not vm.closed and time.monotonic() < deadline:
                time.sleep(0.001)
        return real(*args, **kwargs)
    return stand_in, closer


def test_vcpu_from_fd_racing_vm_close_gives_the_fd_back_unclosed(vm, monkeypatch) -> None:
    from kvm_bindings import vm as vm_module
    vcpu = vm.create_vcpu(0)
    mine = os.dup(vcpu.fileno())
    vcpu.close()
    stand_in, closer = _close_in_another_thread_when_called(vm, vm_module.map_run_page)
    monkeypatch.setattr(vm_module, "map_run_page", stand_in)
    with pytest.raises(StaleHandleError):
        Vcpu.from_fd(vm, mine)
    closer[0].join(10)
    assert is_open(mine) and name_of(mine).startswith("anon_inode:kvm-vcpu")
    os.close(mine)                         # the caller's to close, exactly once


def test_device_from_fd_racing_vm_close_gives_the_fd_back_unclosed(vm, monkeypatch) -> None:
    made = vm.create_device(abi.KVM_DEV_TYPE_VFIO)
    mine = os.dup(made.fileno())
    stand_in, closer = _close_in_another_thread_when_called(vm, Device.__init__)
    monkeypatch.setattr(Device, "__init__", stand_in)
    with pytest.raises(StaleHandleError):
        Device.from_fd(vm, mine, abi.KVM_DEV_TYPE_VFIO)
    closer[0].join(10)
    assert is_open(mine) and made.closed
    os.close(mine)


def test_from_fd_with_the_wrong_parent_is_a_type_error_and_takes_nothing(kvm) -> None:
    with kvm.create_vm() as vm:
        vcpu_fd = os.dup(vm.create_vcpu(0).fileno())
        dev_fd = os.dup(vm.create_device(abi.KVM_DEV_TYPE_VFIO).fileno())
        vm_fd = os.dup(vm.fileno())
        for adopt in (lambda: type(vm).from_fd(None, vm_fd),
                      lambda: Vcpu.from_fd(kvm, vcpu_fd),
                      lambda: Device.from_fd(kvm, dev_fd, abi.KVM_DEV_TYPE_VFIO)):
            with pytest.raises(TypeError, match="takes the"):
                adopt()
        for fd in (vcpu_fd, dev_fd, vm_fd):
            assert is_open(fd)
            os.close(fd)


def test_kvm_cloexec_takes_a_bool_only(kvm) -> None:
    for wrong in (None, "no", 0):
        with pytest.raises(TypeError, match="cloexec"):
            type(kvm)(cloexec=wrong)
