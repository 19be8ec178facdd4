"""File-descriptor objects and the ioctl call every KVM object goes through."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from . import abi
from ._layout import _C, check_int, fill
from .errors import KvmError, KvmUnsupported, StaleHandleError

_Self = TypeVar("_Self", bound="FdObject")

_libc = ctypes.CDLL(None, use_errno=True)
# ctypes releases the GIL around foreign calls: a vCPU thread blocked in KVM_RUN
# does not stop other Python threads.
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int
# The same ioctl for the one call made millions of times (KVM_RUN): without argtypes, ctypes
# skips a from_param conversion per argument, about half the call's cost. Its callers pass
# exactly (int fd, c_ulong number made once, None).
_ioctl_unconverted = _libc["ioctl"]
_ioctl_unconverted.restype = ctypes.c_int

_NAMES = {io.number: name for name, io in abi.IOCTLS.items()}


def ioctl_name(number: int) -> str:
    return _NAMES.get(number, hex(number))


def arg_pointer(arg: Any, name: str = "the ioctl") -> int | None:
    """An ioctl argument as the kernel wants it: ctypes objects by address, ints as they are
    (an unsigned long, the ioctl syscall's argument type: checked, never truncated)."""
    if arg is None:
        return None
    if isinstance(arg, int):
        return check_int(arg, ctypes.c_ulong, f"the argument of {name}")
    return ctypes.addressof(arg)


# Which open object owns each fd number, so that from_fd() can refuse one that is taken.
_OWNERS: dict[int, weakref.ref[FdObject]] = {}


def _nobody() -> None:
    return None


class Unshareable:
    """Objects that own a kernel resource alone: no copies, no pickles.

    A copy would share the fd (or mapping, or slot) and close it behind the
    original's back; a pickle would carry a number that means nothing elsewhere.
    """

    __slots__ = ()

    def __copy__(self) -> Any:
        raise TypeError(f"a {type(self).__name__} owns a kernel object and cannot be copied; "
                        f"pass the object itself around")

    def __deepcopy__(self, memo: Any) -> Any:
        self.__copy__()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"a {type(self).__name__} owns a kernel object and cannot be pickled: "
                        f"its fd and mappings mean nothing in another process")


def close_unclosed(obj: Any) -> None:
    """What __del__ does with an object nobody closed: warn, and close it whatever the
    warning filters do. Under an "error" filter the warning is an exception, and skipping
    the close then would leave a slot pointing at memory the collector unmaps next."""
    try:
        warnings.warn(f"unclosed {obj!r}", ResourceWarning, stacklevel=3, source=obj)
    finally:
        try:
            obj.close()
        except Exception:
            pass


class FdObject(Unshareable):
    """Something that owns one fd: closes it exactly once, refuses use after close, warns if leaked.

    close() from one thread while another is inside an ioctl on the same object
    does not close the fd under it: the fd is closed when the last call in flight
    returns, so its number cannot be reused for another file meanwhile.
    """

    def __init__(self, fd: int) -> None:
        # The first thing every subclass does: from here on this object owns fd, and
        # a failure later in a constructor closes it through close(), exactly once.
        self._fd = fd
        _OWNERS[fd] = weakref.ref(self)
        self._closing = False
        self._closed = False
        self._users = 0
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._children: list[FdObject] = []

    def _adopt(self, child: FdObject, refused: Callable[[], None] | None = None) -> None:
        """Make child (a device, stats fd...) close with this object. A child made while this
        object was being closed in another thread is closed at once instead of escaping (or,
        with refused, handed to that: from_fd() gives the fd back to its caller)."""
        with self._lock:
            if not self._closing:
                self._children.append(child)
                return
        (refused or child.close)()
        raise self._stale()

    def _close_children(self, keep: Callable[[FdObject], bool] = lambda child: False) -> None:
        """Close every adopted child but those keep() says to keep for later."""
        with self._lock:         # after _closing is set, nothing is adopted any more
            children = list(self._children)
        for child in children:
            if not keep(child):
                child.close()

    def _stale(self) -> StaleHandleError:
        return StaleHandleError(f"I/O operation on closed {type(self).__name__}")

    @property
    def fd(self) -> int:
        """The file descriptor; StaleHandleError (a ValueError) once closed."""
        if self._closing:
            raise self._stale()
        return self._fd

    def fileno(self) -> int:
        """The file descriptor, for select(), os.set_inheritable(), socket.send_fds()...;
        StaleHandleError (a ValueError) once closed. The object still owns it: dup() it to
        keep a descriptor of your own."""
        return self.fd

    @property
    def closed(self) -> bool:
        return self._closing

    def ioctl(self, number: int, arg: Any = None, *, name: str | None = None) -> int:
        """Issue one ioctl on this fd; raise KvmError naming it on failure."""
        name = name or ioctl_name(number)
        ptr = arg_pointer(arg, name)
        self._hold()
        try:
            return self._raw_ioctl(number, ptr, name)
        finally:
            self._unhold()

    def _hold(self) -> None:
        """A call is about to use the fd: refuse if closing, else keep the fd open until _unhold.

        Either the caller holds on return, or nothing changed: an exception raised in here
        after the count went up (Ctrl-C as the lock is let go) takes the count back down."""
        held = False
        try:
            with self._lock:
                if self._closing:
                    raise self._stale()
                self._users += 1
                held = True
        except BaseException:
            if held:
                self._unhold()
            raise

    def _unhold(self) -> None:
        with self._lock:       # the fd is closed inside: an interruption cannot skip it
            self._users -= 1
            if self._closed and self._users == 0:
                self._close_fd()

    def _close_fd(self) -> None:
        """The one os.close() of this object's fd (called holding _lock, once)."""
        if _OWNERS.get(self._fd, _nobody)() is self:
            del _OWNERS[self._fd]
        os.close(self._fd)

    def _disown(self) -> None:
        """Let go of the fd without closing it: an adoption refused after the object was made
        leaves the fd with the caller who passed it in."""
        with self._lock:
            self._closing = self._closed = True
            if _OWNERS.get(self._fd, _nobody)() is self:
                del _OWNERS[self._fd]

    def _raw_ioctl(self, number: int, ptr: int | None, name: str) -> int:
        """The ioctl itself, retried on EINTR; callers make sure the fd is still open."""
        while True:
            ret = _ioctl(self._fd, number, ptr)
            if ret >= 0:
                return int(ret)
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise KvmError(name, err)

    def _get(self, number: int, cls: type[_C], **fields: Any) -> _C:
        """A fresh cls (fields preset, range-checked), filled in by the ioctl."""
        obj = fill(cls, **fields)
        self.ioctl(number, obj)
        return obj

    def _release(self) -> BaseException | None:
        """Free what the object holds besides its fd (mappings, children), in the order the
        kernel needs. A call still in flight can keep the fd open: see _hold(). Returns an
        interruption that came while releasing but did not stop it: close() raises it once
        the fd is closed too."""
        return None

    def close(self) -> None:
        """Release everything the object holds, then its fd.

        Closing again does nothing; a close() racing another waits for it. If the release is
        interrupted (Ctrl-C), the object stays closing, refusing every call, and the next
        close() (or the garbage collector) finishes the job: every step is idempotent.
        """
        with self._close_lock:
            if self._closed:
                return
            with self._lock:
                self._closing = True      # from here every new call is refused
            pending = self._release()
            with self._lock:              # the fd is closed inside: nothing can skip it
                self._closed = True
                if self._users == 0:
                    self._close_fd()
        if pending is not None:
            raise pending

    def __enter__(self: _Self) -> _Self:
        self.fd  # noqa: B018 - refuse a closed object here rather than later
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            close_unclosed(self)

    def __repr__(self) -> str:
        state = "closed" if getattr(self, "_closing", True) else f"fd={self._fd}"
        return f"<{type(self).__name__} {state}>"


def check_unowned(fd: int) -> None:
    """Refuse to adopt an fd an open object of this package owns already: both would close
    it, and the second close would hit whatever file got the number in between."""
    owner = _OWNERS.get(fd, _nobody)()
    if owner is not None and not owner._closed:
        raise ValueError(f"fd {fd} is owned by {owner!r}, which closes it: adopt a copy "
                         f"(os.dup({fd})), or use that object")


def anon_inode_name(fd: int) -> str:
    """What the kernel calls the file behind fd ("/dev/kvm", "anon_inode:kvm-vm",
    "anon_inode:kvm-vcpu:3"...), from /proc/self/fd; plain OSError (EBADF) for a closed fd."""
    os.fstat(fd)        # a closed or invalid fd: EBADF, not /proc's ENOENT
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise OSError(e.errno, f"cannot tell what fd {fd} is: /proc/self/fd/{fd} is "
                               f"unreadable ({e.strerror}); is /proc mounted?") from None


def check_same_process(fd: int, what: str) -> None:
    """Refuse a VM, vCPU or device fd whose VM another process created: KVM answers its
    ioctls only in the creator's address space (EIO for everyone else, every call)."""
    # Any ioctl shows it: KVM checks the caller's mm before it looks at the number.
    if _ioctl(fd, abi.KVM_CHECK_EXTENSION, None) < 0 and ctypes.get_errno() == errno.EIO:
        raise KvmError(what, errno.EIO,
                       f"fd {fd} is a KVM {what} fd, but its VM was created by another process "
                       f"(or is dead): KVM serves a VM only to the process that created it. "
                       f"Hand over /dev/kvm (Kvm.from_fd) and create the VM in this process")


class CapabilityOwner(FdObject):
    """An fd that answers KVM_CHECK_EXTENSION (the system fd and VM fds), answers cached."""

    _caps: dict[int, int]

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if absent, else a capability-specific value."""
        cap = check_int(cap, ctypes.c_long, "cap")
        self.fd  # noqa: B018 - a closed object answers nothing, not even from the cache
        if cap not in self._caps:
            self._caps[cap] = self._ask_extension(cap)
        return self._caps[cap]

    def _ask_extension(self, cap: int) -> int:
        return self.ioctl(abi.KVM_CHECK_EXTENSION, cap)

    def require(self, cap: int, what: str) -> int:
        """The capability's value, or KvmUnsupported naming the capability `what` needs."""
        value = self.check_extension(cap)
        if not value:
            raise KvmUnsupported(what, capability_name(cap))
        return value


def capability_name(cap: int) -> str:
    """KVM_CAP_<name>, or the bare number for one these bindings do not know."""
    try:
        return f"KVM_CAP_{abi.Capability(cap).name}"
    except ValueError:
        return f"capability {cap}"
