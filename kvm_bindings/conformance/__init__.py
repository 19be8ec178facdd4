"""Live conformance: does the running kernel do what the shipped bindings' headers promise?

``python -m kvm_bindings conformance [--json] [--junit FILE] [--device PATH]`` runs every
check and exits 0 when each passed or was skipped with a reason, 1 when one failed, and 2
when it could not run at all (no KVM device at the path) or could not write the JUnit
file (the report is printed first); Ctrl-C stops it with status 130 and leaves nothing
open. ``cli()`` is that command; ``run()`` does the checks from Python and returns the
Report. Runs in several threads at once are independent.

Groups:

- api: KVM_GET_API_VERSION, and KVM_GET_VCPU_MMAP_SIZE against sizeof(struct kvm_run);
- capabilities: every KVM_CAP_* the bindings know, asked with KVM_CHECK_EXTENSION, and
  the values api.rst relates to one another;
- ioctls: whether the kernel knows each of KVM's ioctl numbers, and on which fd kinds
  (the probing rules are in kvm_bindings.conformance._ioctls: throwaway VMs, arguments
  the kernel faults on before acting);
- behaviour: the bundled guests (port and string I/O, MMIO, HLT, a triple fault, the
  dirty log, ioeventfd, irqfd through the in-kernel irqchip, MSR exits and filters,
  single-stepping, immediate_exit), each on a fresh VM, skipped with the capability's
  name where the kernel lacks it.

Nothing here touches the host beyond the VMs it creates and closes again.
"""

from __future__ import annotations

import errno
import sys
from typing import TextIO

from ..errors import KvmError, KvmUnavailable
from . import _behaviour, _ioctls, _kernel
from .report import Check, Report, Status

__all__ = ["Check", "Report", "Status", "cli", "run"]

# cli()'s exit status after Ctrl-C, as a shell reports a process SIGINT ended.
INTERRUPTED = 130


def cli(device: str = "/dev/kvm", *, as_json: bool = False, junit: str | None = None,
        verbose: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The conformance command: run, print the report (table or JSON), write the JUnit file.

    0: every check passed or was skipped with a reason; 1: a check failed; 2: no KVM device
    at device, or the JUnit file could not be written (the report is printed before);
    130 (INTERRUPTED): Ctrl-C, after every fd the run opened is closed again."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        report = run(device)
    except KvmUnavailable as e:
        print(f"error: cannot run the conformance checks: {e}", file=err)
        return 2
    except KeyboardInterrupt:
        print("conformance: interrupted", file=err)
        return INTERRUPTED
    print(report.to_json() if as_json else report.table(verbose=verbose), file=out)
    if junit:
        try:
            with open(junit, "w", encoding="utf-8") as f:
                f.write(report.to_junit())
        except OSError as e:
            print(f"error: cannot write the JUnit file {junit}: {e.strerror or e}", file=err)
            return 2
    return report.exit_code


def run(device: str = "/dev/kvm") -> Report:
    """Every check against the KVM device at `device`; KvmUnavailable if it is not one."""
    from .. import Kvm  # the host arch's class
    report = Report(kernel=_kernel_release(), device=device)
    try:
        kvm = Kvm(device)
    except KvmError as e:
        if e.errno != errno.EPROTO:          # KvmUnavailable and the like: could not run
            raise
        # Another API version: the bindings refuse the device, and nothing else can be asked.
        report.add("api_version", "api", "fail", e.strerror or str(e))
        return report
    with kvm:
        _kernel.run_checks(kvm, report)
        _ioctls.run_checks(kvm, report)
        _behaviour.run_checks(kvm, report)
    return report


def _kernel_release() -> str:
    import platform
    return f"Linux {platform.release()} ({platform.machine()})"
