"""python -m kvm_bindings demo | info [--json] | calls [--markdown]
| conformance [--json] [--junit FILE] [--device PATH]"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import sys
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from . import Kvm, KvmError, _calls, abi
from ._calls import Call

LOAD_ADDR = 0x1000   # where guests/greeting.bin was linked (ld -Ttext=0x1000)


def demo(args: argparse.Namespace) -> int:
    """Run the bundled guest: it prints a greeting through port 0x3f8, one OUT at a time."""
    from . import IoExit, x86
    code = resources.files("kvm_bindings").joinpath("guests/greeting.bin").read_bytes()
    exits: collections.Counter[str] = collections.Counter()
    text = bytearray()
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0x10000)
        vm.memory.write(LOAD_ADDR, code)
        vcpu = vm.create_vcpu(0)
        x86.setup_real_mode(vcpu, LOAD_ADDR)
        start = time.perf_counter()
        while True:
            e = vcpu.run()
            exits[type(e).__name__] += 1
            if isinstance(e, IoExit) and e.port == 0x3F8 and e.is_write:
                text += e.data
                sys.stdout.write(bytes(e.data).decode(errors="replace"))
                sys.stdout.flush()
                continue
            break
        elapsed = time.perf_counter() - start
        print(f"guest stopped with {e!r}")
        print(f"{sum(exits.values())} exits in {elapsed * 1000:.1f} ms: "
              + ", ".join(f"{n} x{c}" for n, c in exits.most_common()))
    return 0 if text.startswith(b"Hello") and e.reason == abi.ExitReason.HLT else 1


# The package declaring each arch's own calls (<package>._calls); the core's are in _calls.
_ARCH_PACKAGES = {"x86_64": "x86", "arm64": "arm64", "riscv64": "riscv64"}


def call_tables() -> dict[str, tuple[Call, ...]]:
    """{"all": the arch-neutral calls, and for each arch: its own calls}."""
    tables = {"all": _calls.CALLS}
    for arch, package in _ARCH_PACKAGES.items():
        tables[arch] = importlib.import_module(f"kvm_bindings.{package}._calls").CALLS
    return tables


def host_calls() -> list[Call]:
    """Every call of this host's classes: the arch-neutral ones, then the host arch's."""
    return [*_calls.CALLS, *call_tables().get(abi.HOST_ARCH or "", ())]


def _supported(kvm: Kvm, call: Call) -> bool:
    if call.capability is None:
        return True
    cap = abi.Capability.__members__.get(call.capability.removeprefix("KVM_CAP_"))
    return cap is not None and kvm.check_extension(cap) > 0


def info(args: argparse.Namespace) -> int:
    """What this host's KVM supports."""
    from .x86 import X86Kvm
    with Kvm() as kvm:
        report: dict[str, Any] = {
            "api_version": kvm.api_version,
            "bindings_kernel": abi.KERNEL_VERSION,
            "vcpu_mmap_size": kvm.get_vcpu_mmap_size(),
            "max_vcpus": kvm.max_vcpus(),
            "vm_types": kvm.vm_types(),
            "capabilities": {f"KVM_CAP_{c.name}": v for c, v in kvm.capabilities().items()},
        }
        probes: list[tuple[str, Callable[[], int]]] = []
        if isinstance(kvm, X86Kvm):
            x86kvm = kvm
            probes += [("supported_cpuid_entries", lambda: x86kvm.get_supported_cpuid().nent),
                       ("emulated_cpuid_entries", lambda: x86kvm.get_emulated_cpuid().nent),
                       ("msr_indices", lambda: len(x86kvm.get_msr_index_list())),
                       ("feature_msrs", lambda: len(x86kvm.get_msr_feature_index_list()))]
        for key, get in probes:
            try:
                report[key] = get()
            except KvmError as e:
                report[key] = f"unavailable: {e}"
        report["calls"] = {fd: [{"method": c.method, "ioctls": list(c.ioctls),
                                 "capability": c.capability, "supported": _supported(kvm, c)}
                                for c in group]
                           for fd, group in _calls.by_fd(host_calls()).items()}
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    caps = report.pop("capabilities")
    calls = report.pop("calls")
    for k, v in report.items():
        print(f"{k:26} {v}")
    have = sum(1 for v in caps.values() if v)
    print(f"capabilities               {have} of {len(caps)} present")
    for name, value in caps.items():
        print(f"  {name:40} {value}")
    every = [c for group in calls.values() for c in group]
    print(f"calls                      {sum(c['supported'] for c in every)} of {len(every)} "
          f"supported")
    for fd, group in calls.items():
        print(f"  {fd} fd")
        for c in group:
            mark = "yes" if c["supported"] else "no"
            print(f"    {c['method']:36} {mark:4} {c['capability'] or ''}".rstrip())
    return 0


def calls(args: argparse.Namespace) -> int:
    """List the calls that issue KVM ioctls, by fd, with the capability each needs."""
    if args.markdown:
        sys.stdout.write(_calls.markdown(call_tables()))
        return 0
    for fd, group in _calls.by_fd(host_calls()).items():
        print(f"{fd} fd")
        for c in group:
            print(f"  {c.method:36} {', '.join(c.ioctls)}"
                  + (f" ({c.capability})" if c.capability else ""))
    return 0


def conformance(args: argparse.Namespace) -> int:
    """Check the running kernel against the bindings: API, capabilities, ioctls, guest behaviour."""
    from . import conformance as live
    return live.cli(args.device, as_json=args.json, junit=args.junit, verbose=args.verbose)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvm_bindings", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help=demo.__doc__).set_defaults(func=demo)
    p = sub.add_parser("info", help=info.__doc__)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=info)
    p = sub.add_parser("calls", help=calls.__doc__, description=f"{calls.__doc__} Without "
                       "--markdown: this host's calls; with it: every arch's, as README lists them.")
    p.add_argument("--markdown", action="store_true", help="README's tables, every arch")
    p.set_defaults(func=calls)
    p = sub.add_parser("conformance", help=conformance.__doc__,
                       description=f"{conformance.__doc__} Exit status 0: every check passed "
                       "or was skipped with a reason; 1: a check failed; 2: could not run.")
    p.add_argument("--json", action="store_true", help="each check as JSON")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML to FILE")
    p.add_argument("--device", default="/dev/kvm", help="the KVM device (default /dev/kvm)")
    p.add_argument("--verbose", action="store_true", help="list passing checks too")
    p.set_defaults(func=conformance)
    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except KvmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:     # output piped into head and the like
        return 0


if __name__ == "__main__":
    sys.exit(main())
