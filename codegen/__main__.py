"""python -m codegen: fetch headers, generate bindings, check them, run the probe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import GeneratorError


def _arch_names(args: argparse.Namespace, doing: str) -> list[str]:
    """--arch, or by default every arch the headers have, saying so when that is not all."""
    from . import headers
    from .arches import ARCHES, host_arch
    if args.arch:
        return list(args.arch)
    if args.include_dir:
        names = headers.include_dir_arches(Path(args.include_dir))
        where = f"{args.include_dir} has asm/kvm.h for"
        if not names:
            # no asm/ at all (headers that need none): the host's C ABI is the one to use
            host = host_arch()
            if host is None:
                raise GeneratorError(f"no asm/kvm.h for any arch ({', '.join(ARCHES)}) under "
                                     f"this include directory; name one with --arch",
                                     str(Path(args.include_dir).resolve()))
            names, where = [host.name], f"{args.include_dir} has no asm/kvm.h; this host is"
    else:
        version = args.version or headers.shipped_version()
        manifest = headers.load_manifest()["versions"]
        if version not in manifest:
            return list(ARCHES)        # from_manifest names the pinned versions
        names = [a for a in ARCHES if a in manifest[version]["arches"]]
        where = f"kernel {version} is pinned for"
    if names != list(ARCHES):
        print(f"{where} {', '.join(names)} only: {doing} {', '.join(names)} "
              f"(choose with --arch)")
    return names


def _header_sets(args: argparse.Namespace, arch_names: list[str]):
    from . import headers
    from .arches import get_arch
    for name in arch_names:
        arch = get_arch(name)
        if args.include_dir:
            hs = headers.from_include_dir(Path(args.include_dir), arch)
        else:
            hs = headers.from_manifest(args.version or headers.shipped_version(), arch)
        for header, why in hs.left_out:
            print(f"{arch.name} {hs.version}: left out {header}, whose types and constants the "
                  f"module lacks: {why}")
        yield arch, hs


def cmd_fetch(args: argparse.Namespace) -> int:
    from . import fetch, headers
    headers.HEADERS_DIR.mkdir(parents=True, exist_ok=True)   # the user cache may not exist yet
    for v in args.versions or headers.manifest_versions():
        fetch.fetch(v)
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    from . import fetch
    _need_checkout("pin", "it records the new version in headers/manifest.json, and an installed "
                   "generator's manifest is read-only package data")
    entry = fetch.pin(args.version, pypi=args.pypi, debian=args.debian, arches=args.arch,
                      force=args.force)
    print(f"pinned {args.version}: {len(entry['files'])} headers, arches {', '.join(entry['arches'])}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from . import pipeline
    from .arches import SHIPPED_ARCHES
    if not args.out:
        _need_checkout("generate without --out", "it rewrites the checkout's kvm_bindings/abi/; "
                       "name a folder to write to with --out DIR")
    out = Path(args.out) if args.out else pipeline.ABI_DIR
    files = {}
    done = []
    for arch, hs in _header_sets(args, _arch_names(args, "generating")):
        files.update(pipeline.generate(hs, arch, with_facts=not args.no_facts))
        done.append((arch.name, hs))
    if args.out:
        # its own package: `import <out's name>` gives the host arch, the others by name
        files.update(pipeline.package_init([a for a, _ in done], done[0][1].version,
                                           done[0][1].source))
    elif not args.arch and not args.include_dir and not args.version:
        files.update(pipeline.package_init(SHIPPED_ARCHES))
    pipeline.write_files(out, files)
    for name in sorted(files):
        print(f"wrote {out / name}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    _need_checkout("check", "it compares the checkout's kvm_bindings/abi/ with a fresh generation")
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
    for arch, hs in _header_sets(args, _arch_names(args, "probing")):
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


def _need_checkout(what: str, why: str) -> None:
    from .headers import CHECKOUT, ROOT
    if CHECKOUT is None:
        raise GeneratorError(f"{what} works only in a checkout of kvm-bindings: {why}. This "
                             f"generator is installed (in {ROOT}), not in a checkout")


def console() -> int:
    """The kvm-codegen console script: python -m codegen under its installed name."""
    return main(prog="kvm-codegen")


def main(argv: list[str] | None = None, prog: str = "python -m codegen") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("fetch-headers",
                       help="fetch pinned kernel headers into headers/<version>/ in a checkout, else "
                            "into ~/.cache/kvm-bindings/headers/<version>/ ($KVM_BINDINGS_HEADERS "
                            "overrides either)")
    p.add_argument("versions", nargs="*", help="kernel versions (default: every pinned one)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("pin", help="pin a new kernel version's header source in the manifest")
    p.add_argument("version")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pypi", help="PACKAGE==VERSION, e.g. ziglang==0.17.0")
    src.add_argument("--debian", action="append",
                     help="PACKAGE=VERSION of a linux-libc-dev-<arch>-cross package (repeat per arch; "
                          "the first also gives linux/ and asm-generic/)")
    p.add_argument("--arch", action="append",
                   help="an arch to pin (repeatable; default: every arch that has KVM in that "
                        "kernel, e.g. not riscv64 before 5.16); the source must have its asm/kvm.h")
    p.add_argument("--force", action="store_true", help="replace the version's existing pin")
    p.set_defaults(func=cmd_pin)

    for name, func, text in (("generate", cmd_generate, "write ctypes modules"),
                             ("probe", cmd_probe, "check generated bindings against the C compiler")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--version", help="a pinned kernel version (default: the shipped one)")
        p.add_argument("--include-dir",
                       help="use headers from this include directory instead (a system one such "
                            "as /usr/include, or a headers/<version>-like folder)")
        p.add_argument("--arch", action="append",
                       help="target arch (repeatable; default: every arch the headers have: "
                            "those the manifest pins for the version, or with --include-dir "
                            "those whose asm/kvm.h it holds, e.g. only the host's in /usr/include)")
        p.set_defaults(func=func)
        if name == "generate":
            p.add_argument("--out", help="output directory, written as an importable package "
                                         "with an __init__.py (default: kvm_bindings/abi in a "
                                         "checkout; required where the generator is installed)")
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
    from . import INSTALL_EXTRA, missing_requirements
    missing = missing_requirements()
    if missing:
        print(f"error: the generator needs {' and '.join(missing)}, which the codegen extra "
              f"installs: {INSTALL_EXTRA}", file=sys.stderr)
        return 1
    try:
        return int(args.func(args))
    except GeneratorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
