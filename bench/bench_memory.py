"""Guest memory copies against a plain memoryview copy of the same size, in one run.

    python bench/bench_memory.py [--mib 256] [--regions 1] [--rounds 7]

The guest has --mib MiB of memory in --regions adjacent regions (more than one: every copy
crosses region boundaries). Each round times, back to back and each first in turn, an
operation and its baselines:

    read      vm.memory.read(0, size)          vs  bytes(view) of a plain mmap
    readinto  vm.memory.readinto(0, buffer)    vs  dest_view[:] = view, plain mmaps
    write     vm.memory.write(0, data)         vs  view[:] = data_view, plain mmaps
    load      vm.memory.load(0, path)          vs  the same view copy, and vs
                                                   f.readinto(plain mmap) of the same file

The file is in /dev/shm (else the temp dir), so load reads from the page cache. Every
destination is touched before the first round, so no side pays the page faults of a
first write. Reported: the best of the rounds for each side, the spread of the rounds
((worst - best) / best), and ours / baseline. Target: every ratio at most 1.25x.

read pays for its fresh result's page faults, as bytes(view) does: on a nested-KVM host
that is most of its time. load's floor is the kernel's read() from the page cache, which
is slower than memcpy here, hence its second row. With --regions > 1 the copies are cut
at region boundaries; glibc's memcpy switches to a faster loop for very large copies
(16x its non-temporal threshold), so a second table compares with a plain copy cut alike.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from kvm_bindings import Kvm  # noqa: E402

MiB = 1 << 20
TARGET = 1.25


def timed(call: Callable[[], object]) -> float:
    t = time.perf_counter()
    call()
    return time.perf_counter() - t


def report(name: str, ours: list[float], base: list[float], base_name: str) -> bool:
    best, base_best = min(ours), min(base)
    ratio = best / base_best
    ok = ratio <= TARGET
    print(f"{name:9} {best * 1e3:7.1f} ms (spread {max(ours) / best - 1:5.1%})   "
          f"{base_name:22} {base_best * 1e3:7.1f} ms (spread {max(base) / base_best - 1:5.1%})   "
          f"ratio {ratio:.2f}x {'ok' if ok else 'MISSED'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--regions", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    size = args.mib * MiB
    if size % args.regions or (size // args.regions) % mmap.PAGESIZE:
        ap.error("--regions must split the memory into whole pages")
    part = size // args.regions
    tmpdir = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with Kvm() as kvm, kvm.create_vm() as vm, tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        for i in range(args.regions):
            vm.add_memory(i * part, part)
        data = os.urandom(MiB) * args.mib
        src = mmap.mmap(-1, size)
        src[:] = data
        dest = mmap.mmap(-1, size)
        dest[:] = data                      # touched: no first-write page faults in a round
        vm.memory.write(0, data)            # likewise for guest memory
        path = Path(tmp) / "image"
        path.write_bytes(data)
        src_view, dest_view = memoryview(src), memoryview(dest)

        def plain_load() -> None:
            with open(path, "rb", buffering=0) as f:
                f.readinto(dest)

        def plain_copy() -> None:
            dest_view[:] = src_view

        def plain_pieces() -> None:         # the same copy, cut where the regions are cut
            for i in range(0, size, part):
                dest_view[i:i + part] = src_view[i:i + part]

        cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
            ("read", lambda: vm.memory.read(0, size), lambda: bytes(src_view)),
            ("readinto", lambda: vm.memory.readinto(0, dest), plain_copy),
            ("write", lambda: vm.memory.write(0, src), plain_copy),
            ("load", lambda: vm.memory.load(0, path), plain_copy),
        ]
        extra = {"load": ("load file base", plain_load), "write": ("pieces base", plain_pieces)}
        times: dict[str, list[float]] = {}
        for name, ours, base in cases:
            runs = [(name, ours), (name + " base", base)] + ([extra[name]] if name in extra else [])
            for round_ in range(args.rounds):
                # Each round in turn goes first: neither side always follows the other.
                for label, call in runs[round_ % len(runs):] + runs[:round_ % len(runs)]:
                    times.setdefault(label, []).append(timed(call))
        assert vm.memory.read(size - 8, 8) == data[-8:]
        src_view.release()
        dest_view.release()
        src.close()
        dest.close()
    print(f"{args.mib} MiB over {args.regions} adjacent region(s), best of {args.rounds} rounds:")
    missed = [name for name, _, _ in cases
              if not report(name, times[name], times[name + " base"], "memoryview copy")]
    if not report("load", times["load"], times["load file base"], "f.readinto(plain mmap)"):
        missed.append("load vs f.readinto")
    if args.regions > 1:
        print(f"the same plain copy in {args.regions} pieces, as the regions cut it (glibc's "
              f"memcpy picks its loop by size):")
        report("write", times["write"], times["pieces base"], "memoryview copy, cut")
    print(f"target: every ratio <= {TARGET}x: " + (f"MISSED by {', '.join(missed)}" if missed
                                                     else "met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
