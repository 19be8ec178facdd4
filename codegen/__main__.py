"""python -m codegen: fetch headers, generate bindings, check them, run the probe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import GeneratorError


def _header_sets(args: argparse.Namespace, arch_names: list[str]):
    from . import headers
    from .arches import get_arch
    for name in arch_names:
        arch = get_arch(name)
        if args.include_dir:
            yield arch, headers.from_include_dir(Path(args.include_dir), arch)
        else:
            yield arch, headers.from_manifest(args.version or headers.shipped_version(), arch)


def cmd_fetch(args: argparse.Namespace) -> int:
    from . import fetch, headers
    for v in args.versions or headers.manifest_versions():
        fetch.fetch(v)
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    from . import fetch
    entry = fetch.pin(args.version, pypi=args.pypi, debian=args.debian)
    print(f"pinned {args.version}: {len(entry['files'])} headers, arches {', '.join(entry['arches'])}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from . import pipeline
    from .arches import SHIPPED_ARCHES
    out = Path(args.out) if args.out else pipeline.ABI_DIR
    files = {}
    for arch, hs in _header_sets(args, args.arch or list(SHIPPED_ARCHES)):
        files.update(pipeline.generate(hs, arch, with_facts=not args.no_facts))
    if not args.arch and not args.include_dir and not args.version:
        files.update(pipeline.package_init(SHIPPED_ARCHES))
    pipeline.write_files(out, files)
    for name in sorted(files):
        print(f"wrote {out / name}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from . import pipeline
    diffs = pipeline.check()
    if diffs:
        for d in diffs:
            print(d)
        print("kvm_bindings/abi/ differs from what the generator writes now; run "
              "`python -m codegen generate` and commit the result", file=sys.stderr)
        return 1
    print("kvm_bindings/abi/ is up to date")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from . import conformance
    status = 0
    for arch, hs in _header_sets(args, args.arch or ["x86_64"]):
        report = conformance.run(hs, arch)
        print(report.summary())
        for m in report.mismatches[:50]:
            print("  MISMATCH", m)
        status |= bool(report.mismatches)
    return status


def cmd_diff(args: argparse.Namespace) -> int:
    import json

    from . import diff
    from .arches import get_arch
    report = diff.diff(args.old, args.new, get_arch(args.arch), removals_ok=args.removals_ok)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.text())
    return 1 if report.breaking else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m codegen", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("fetch-headers", help="fetch pinned kernel headers into headers/<version>/")
    p.add_argument("versions", nargs="*", help="kernel versions (default: every pinned one)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("pin", help="pin a new kernel version's header source in the manifest")
    p.add_argument("version")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pypi", help="PACKAGE==VERSION, e.g. ziglang==0.17.0")
    src.add_argument("--debian", action="append",
                     help="PACKAGE=VERSION of a linux-libc-dev-<arch>-cross package (repeat per arch; "
                          "the first also gives linux/ and asm-generic/)")
    p.set_defaults(func=cmd_pin)

    for name, func, text in (("generate", cmd_generate, "write ctypes modules"),
                             ("probe", cmd_probe, "check generated bindings against the C compiler")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--version", help="a pinned kernel version (default: the shipped one)")
        p.add_argument("--include-dir", help="use headers from this include directory instead")
        p.add_argument("--arch", action="append", help="target arch (repeatable)")
        p.set_defaults(func=func)
        if name == "generate":
            p.add_argument("--out", help="output directory (default: kvm_bindings/abi)")
            p.add_argument("--no-facts", action="store_true",
                           help="do not run the C probe to store its facts beside the module")

    from .arches import ARCHES
    p = sub.add_parser(
        "diff", help="what changed in the KVM ABI between two header sets; "
                     "exit 1 if anything existing changed incompatibly",
        description="Compare the KVM ABI of two header sets: what linux/kvm.h and the arch's "
                    "asm/kvm.h declare, and the types those declarations use. Changes to "
                    "anything else the KVM headers include are listed apart, as not KVM ABI, "
                    "and never count as breaking. Exit status: 1 if the KVM ABI changed "
                    "incompatibly, else 0.")
    p.add_argument("old", help="the header set to compare from: a pinned version (6.1.4), "
                               "a headers/<version>-like folder, or an include directory")
    p.add_argument("new", help="the header set to compare to, given the same ways as OLD")
    p.add_argument("--arch", default="x86_64", choices=sorted(ARCHES), metavar="ARCH",
                   help=f"the arch whose asm/ headers and ABI rules to use: "
                        f"{', '.join(sorted(ARCHES))} (default: x86_64)")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (verdict, KVM changes, changes outside the "
                        "KVM headers) instead of text")
    p.add_argument("--removals-ok", action="store_true",
                   help="list removals from the KVM ABI without counting them as breaking "
                        "(verdict: compatible, N removals allowed)")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("check", help="fail if kvm_bindings/abi/ differs from a fresh generation")
    p.set_defaults(func=cmd_check)

    args = ap.parse_args(argv)
    try:
        return int(args.func(args))
    except GeneratorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
