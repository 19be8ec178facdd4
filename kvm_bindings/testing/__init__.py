"""A kit for writing KVM tests in Python: pytest fixtures, a guest assembler and ucalls.

- Fixtures kvm, vm and vcpu, from the pytest plugin kvm_bindings.testing.plugin (loaded
  through the pytest11 entry point; only that module imports pytest).
- assemble(): GNU as source (a string or a .S file) -> guest bytes, errors at the line.
- kvm_ucall.h, included by assemble(): GUEST_SYNC, GUEST_PRINTF, GUEST_ASSERT_EQ ...
  GUEST_DONE, each carrying the guest's __FILE__ and __LINE__ to the host.
- ucalls() / run_guest(): run a vCPU and turn its ucalls into Sync, Print and Done, and
  a failed guest assertion into GuestAssertionError; every run is bounded.
- load_guest(): put the bytes in the VM and the vCPU in real, protected or long mode.
x86 guests only (the assembler and the modes are x86's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# The names below load their module when first used: the pytest plugin (a submodule) is
# loaded by every pytest run where kvm-bindings is installed, and must cost that run nothing.
_EXPORTS = {
    "INCLUDE_DIR": "assembler",
    "TOOLS": "assembler",
    "AssemblyError": "assembler",
    "MissingToolError": "assembler",
    "Mode": "assembler",
    "SourceError": "assembler",
    "assemble": "assembler",
    "mode_bits": "assembler",
    "CODE_ADDR": "guest",
    "GDT_ADDR": "guest",
    "MEMORY_ADDR": "guest",
    "MEMORY_SIZE": "guest",
    "PAGE_TABLES": "guest",
    "REAL_MODE_STACK": "guest",
    "STACK": "guest",
    "TSS_ADDR": "guest",
    "load_guest": "guest",
    "MAX_EXITS": "ucall",
    "RECORD_SIZE": "ucall",
    "TIMEOUT": "ucall",
    "UCALL_PORT": "ucall",
    "Done": "ucall",
    "Event": "ucall",
    "GuestAssertionError": "ucall",
    "GuestTimeoutError": "ucall",
    "Print": "ucall",
    "Sync": "ucall",
    "UcallError": "ucall",
    "UnexpectedExitError": "ucall",
    "read_ucall": "ucall",
    "run_guest": "ucall",
    "ucalls": "ucall",
}

if TYPE_CHECKING:
    from .assembler import (
        INCLUDE_DIR,
        TOOLS,
        AssemblyError,
        MissingToolError,
        Mode,
        SourceError,
        assemble,
        mode_bits,
    )
    from .guest import (
        CODE_ADDR,
        GDT_ADDR,
        MEMORY_ADDR,
        MEMORY_SIZE,
        PAGE_TABLES,
        REAL_MODE_STACK,
        STACK,
        TSS_ADDR,
        load_guest,
    )
    from .ucall import (
        MAX_EXITS,
        RECORD_SIZE,
        TIMEOUT,
        UCALL_PORT,
        Done,
        Event,
        GuestAssertionError,
        GuestTimeoutError,
        Print,
        Sync,
        UcallError,
        UnexpectedExitError,
        read_ucall,
        run_guest,
        ucalls,
    )

__all__ = [
    "CODE_ADDR", "GDT_ADDR", "INCLUDE_DIR", "MAX_EXITS", "MEMORY_ADDR", "MEMORY_SIZE", "PAGE_TABLES",
    "REAL_MODE_STACK", "RECORD_SIZE", "STACK", "TIMEOUT", "TOOLS", "TSS_ADDR", "UCALL_PORT",
    "AssemblyError", "Done", "Event", "GuestAssertionError", "GuestTimeoutError", "MissingToolError",
    "Mode", "Print", "SourceError", "Sync", "UcallError", "UnexpectedExitError", "assemble",
    "load_guest", "mode_bits", "read_ucall", "run_guest", "ucalls",
]


def __getattr__(name: str) -> object:
    import importlib
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvm_bindings.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
