"""Testing arches this host cannot run: a C oracle built by the arch's cross compiler, and a
fake kernel that answers ioctls so the arch classes' code runs here.

The oracle compiles C expressions (the uapi's macros with arguments) against the pinned
kernel's headers for the arch, compile-only, into a data section, and reads the values
back from the object file, as codegen/probe.py does for the generated modules.

The fake kernel replaces libc's ioctl() under the runtime (the one function every KVM
call goes through) and records each call: which fd, the request number and the bytes
the argument points at, as the kernel would copy them in.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .conftest import REQUIRE_TOOLS, need

_SECTION = ".oracle.values"


def c_values(arch: str, exprs: list[str]) -> list[int]:
    """What the arch's C compiler says each expression (an unsigned 64-bit value) is, with
    <linux/kvm.h> of the shipped kernel included. Skips (or fails, where tools are
    required) without the cross compiler or the fetched headers."""
    from codegen import headers
    from codegen.arches import get_arch
    from codegen.errors import GeneratorError
    from codegen.probe import elf_sections

    target = get_arch(arch)
    cc = target.compiler()
    need(cc is not None, f"no C compiler for {arch} (Debian: gcc-aarch64-linux-gnu, "
         "gcc-riscv64-linux-gnu)", REQUIRE_TOOLS)
    assert cc is not None
    try:
        hs = headers.from_manifest(headers.shipped_version(), target)
    except GeneratorError as e:
        need(False, f"{e} (run `python -m codegen fetch-headers`)", REQUIRE_TOOLS)
        raise
    body = "".join(f"    (unsigned long long)({e}),\n" for e in exprs)
    src = ("#include <stddef.h>\n#include <linux/kvm.h>\n"
           f'__attribute__((used, section("{_SECTION}")))\n'
           f"const unsigned long long oracle_values[] = {{\n{body}}};\n")
    with tempfile.TemporaryDirectory() as tmp:
        c_file, obj = Path(tmp) / "oracle.c", Path(tmp) / "oracle.o"
        c_file.write_text(src)
        proc = subprocess.run([cc, "-std=gnu11", "-D__signed__=signed", "-c", "-o", str(obj),
                               str(c_file), *(f"-I{d}" for d in hs.include_dirs)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"the oracle did not compile with {cc}:\n{proc.stderr[-3000:]}")
        data = elf_sections(obj.read_bytes())[_SECTION]
    order = "little" if target.byteorder == "little" else "big"
    values = [int.from_bytes(data[i:i + 8], order) for i in range(0, len(data), 8)]
    assert len(values) == len(exprs)
    return values


# ---- the fake kernel ---------------------------------------------------------------------

@dataclass
class Call:
    """One ioctl as the kernel saw it."""

    role: str            # "system", "vm", "vcpu" or "device": which kind of fd
    number: int
    arg: int | None      # the raw argument: a pointer, or an int for by-value ioctls
    data: bytes          # the _IOC size bytes behind a pointer, at call time (b"" if none)
    arg_size: int | None = None   # sizeof the ctypes object the runtime passed (None: an int)

    def struct(self, cls: Any) -> Any:
        """The argument read as a ctypes struct (a copy)."""
        assert len(self.data) == ctypes.sizeof(cls), (len(self.data), cls)
        return cls.from_buffer_copy(self.data)


Handler = Callable[[Call], int]


@dataclass
class FakeKernel:
    """Answers ioctls for one arch's ABI module: the system fd is /dev/null (a character
    device, as /dev/kvm is), VMs and devices are more /dev/null fds, vCPUs are memfds the
    runtime maps as kvm_run. `caps` answers KVM_CHECK_EXTENSION; `handlers` {ioctl name:
    fn(call) -> int} override the defaults; a handler raising OSError fails the ioctl
    with that errno."""

    abi: ModuleType
    caps: dict[int, int] = field(default_factory=dict)
    handlers: dict[str, Handler] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    roles: dict[int, str] = field(default_factory=dict)
    mmap_size: int = 4 * mmap.PAGESIZE
    _passed: dict[int | None, int] = field(default_factory=dict)

    def number(self, name: str) -> int:
        return int(self.abi.IOCTLS[name].number)

    def names(self, number: int) -> list[str]:
        """Every ioctl of the arch with this number (a few share one: KVM_GET_ONE_REG and
        KVM_ARM_SET_DEVICE_ADDR are both _IOW(KVMIO, 0xab, 16 bytes))."""
        return [n for n, io in self.abi.IOCTLS.items() if io.number == number]

    def calls_to(self, name: str, role: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.number == self.number(name)
                and (role is None or c.role == role)]

    def _size(self, number: int) -> int:
        a = self.abi
        return (number >> a._IOC_SIZESHIFT) & ((1 << a._IOC_SIZEBITS) - 1)

    def _new_fd(self, role: str) -> int:
        if role == "vcpu":
            fd = os.memfd_create("fake-kvm-vcpu", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.mmap_size)
        else:
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        self.roles[fd] = role
        return fd

    def ioctl(self, fd: int, number: int, arg: int | None) -> int:
        size = self._size(number)
        is_pointer = arg is not None and size > 0
        data = ctypes.string_at(arg, size) if is_pointer and arg else b""
        call = Call(self.roles.get(fd, "system"), number, arg, data, self._passed.pop(arg, None))
        self.calls.append(call)
        names = self.names(number)
        try:
            for name in names:
                if name in self.handlers:
                    return self.handlers[name](call)
            return self._default(call, names)
        except OSError as e:
            ctypes.set_errno(e.errno or errno.EIO)
            return -1

    def _default(self, call: Call, names: list[str]) -> int:
        a = self.abi
        if "KVM_GET_API_VERSION" in names:
            return int(a.KVM_API_VERSION)
        if "KVM_CHECK_EXTENSION" in names:
            return self.caps.get(int(call.arg or 0), 0)
        if "KVM_GET_VCPU_MMAP_SIZE" in names:
            return self.mmap_size
        if "KVM_CREATE_VM" in names:
            return self._new_fd("vm")
        if "KVM_CREATE_VCPU" in names:
            return self._new_fd("vcpu")
        if "KVM_CREATE_DEVICE" in names:
            assert call.arg is not None
            req = a.kvm_create_device.from_address(call.arg)
            req.fd = self._new_fd("device")
            return 0
        return 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
        """Route every module's ioctl() (they bind libc's at import) through this kernel."""
        import importlib

        from kvm_bindings import _fd
        real_arg_pointer = _fd.arg_pointer

        def arg_pointer(arg: Any, name: str = "the ioctl") -> int | None:
            ptr = real_arg_pointer(arg, name)
            if arg is not None and not isinstance(arg, int):
                self._passed[ptr] = ctypes.sizeof(arg)    # what the runtime handed the kernel
            return ptr
        monkeypatch.setattr(_fd, "arg_pointer", arg_pointer)
        fake = _CFunction(self.ioctl)
        for name in ("kvm_bindings._fd", "kvm_bindings.system", "kvm_bindings.vm",
                     "kvm_bindings.vcpu", "kvm_bindings.device"):
            module = importlib.import_module(name)
            if hasattr(module, "_ioctl"):
                monkeypatch.setattr(module, "_ioctl", fake)
        return self


class _CFunction:
    """Called like the ctypes ioctl: arguments as Python ints (or None)."""

    def __init__(self, fn: Callable[[int, int, int | None], int]) -> None:
        self.fn = fn

    def __call__(self, fd: int, number: int, arg: int | None) -> int:
        return self.fn(fd, number, arg)


def default_caps(abi: ModuleType) -> dict[int, int]:
    """What a capable host says: the capabilities every test here relies on."""
    cap = abi.Capability
    return {cap.CHECK_EXTENSION_VM: 1, cap.MAX_VCPU_ID: 512, cap.MAX_VCPUS: 512,
            cap.ONE_REG: 1, cap.DEVICE_CTRL: 1, cap.MP_STATE: 1, cap.SET_GUEST_DEBUG: 1,
            cap.ENABLE_CAP: 1, cap.ENABLE_CAP_VM: 1}


def only_call(kernel: FakeKernel, abi: Any, name: str, role: str) -> Call:
    """The one call of ioctl `name` on a `role` fd, checked against the arch's IOCTLS table:
    its number, and the size of what the runtime passed is what the kernel copies."""
    calls = kernel.calls_to(name, role)
    assert len(calls) == 1, f"{name} on the {role} fd: {len(calls)} calls"
    io = abi.IOCTLS[name]
    assert calls[0].number == io.number
    if io.size and io.arg_type is not None:
        assert calls[0].arg_size == io.size == ctypes.sizeof(io.arg_type)
    return calls[0]


def one_reg_registers(kernel: FakeKernel, abi: Any, regs: dict[int, int]) -> None:
    """GET/SET_ONE_REG against a register file, reading and writing KVM_REG_SIZE(id) bytes
    at the address in kvm_one_reg, as the kernel does (ENOENT for an id it lacks)."""
    from kvm_bindings.vcpu import reg_size

    def get(call: Call) -> int:
        req = call.struct(abi.kvm_one_reg)
        if req.id not in regs:
            raise OSError(errno.ENOENT, "")
        size = reg_size(req.id)
        ctypes.memmove(req.addr, regs[req.id].to_bytes(size, "little"), size)
        return 0

    def put(call: Call) -> int:
        req = call.struct(abi.kvm_one_reg)
        if req.id not in regs:
            raise OSError(errno.ENOENT, "")
        regs[req.id] = int.from_bytes(ctypes.string_at(req.addr, reg_size(req.id)), "little")
        return 0
    kernel.handlers |= {"KVM_GET_ONE_REG": get, "KVM_SET_ONE_REG": put}
