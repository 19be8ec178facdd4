"""Dirty logs of a big, fully dirty slot: kvm_bindings' DirtyBitmap against C, in one run.

    python bench/bench_dirty.py [--gib G] [--rounds R] [--reps N]

Both sides map G GiB (default 16) with MAP_NORESERVE, never touched, as one slot logging
dirty pages, with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and KVM_DIRTY_LOG_INITIALLY_SET
enabled first: every page starts dirty, no guest needed. Before each measurement,
logging is turned off and on, which makes every page dirty again. Measured:
- get + len: KVM_GET_DIRTY_LOG plus a popcount (C: a buffer allocated once, a
  __builtin_popcountll loop; Python: len(vm.get_dirty_log(region))). Target <= 3x C.
- runs: scanning that bitmap for runs of dirty pages (C: a word loop that skips all-0
  and all-1 words; Python: list(bitmap.runs())). Target <= 3x C.
- clear: KVM_CLEAR_DIRTY_LOG of the whole slot (C: with the bitmap it just got; Python:
  vm.clear_dirty_log(region, bitmap), and vm.clear_dirty_log(region), which builds the
  all-ones bitmap itself). Target <= 2x C.
- ring: a guest (kvm_bindings/guests/dirty_pages.S) writes N pages (default 64,512: a ring of
  65,536 entries less KVM's reserve); then vcpu.harvest_dirty_ring() against C copying
  out each published entry's slot and offset and marking it for reset. Also reported
  at N/8, to show the cost per entry stays flat. No target in the issue; reported.
The C baseline (bench/dirty_baseline.c) is compiled with gcc -O2 -march=native (so
popcount is one instruction) at bench time. Rounds alternate C and Python, N
measurements each; the best of each side is compared, and the spread (best..worst) shown.
"""

from __future__ import annotations

import argparse
import mmap
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from kvm_bindings import Backing, Capability, Kvm, abi, x86  # noqa: E402

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)   # Python < 3.13 does not name it
BASE = 1 << 32


def python_round(kvm: Kvm, gib: int,
                 reps: int) -> list[tuple[float, float, float, float, int, int, float]]:
    """reps times (get+len us, runs us, clear-by-bitmap us, clear-whole-range us, dirty, runs,
    len us)."""
    out = []
    with kvm.create_vm() as vm:
        vm.enable_cap(Capability.MANUAL_DIRTY_LOG_PROTECT2,
                      abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | abi.KVM_DIRTY_LOG_INITIALLY_SET)
        mapping = mmap.mmap(-1, gib << 30, flags=mmap.MAP_PRIVATE | MAP_NORESERVE)
        backing = Backing.from_buffer(mapping)
        region = vm.add_memory(BASE, backing=backing, log_dirty=True)
        for _ in range(reps):
            vm.set_dirty_logging(region, False)
            vm.set_dirty_logging(region, True)          # every page dirty again
            t0 = time.perf_counter()
            bitmap = vm.get_dirty_log(region)
            tp = time.perf_counter()
            dirty = len(bitmap)
            t1 = time.perf_counter()
            runs = list(bitmap.runs())
            t2 = time.perf_counter()
            vm.clear_dirty_log(region, bitmap)
            t3 = time.perf_counter()
            if sum(n for _, n in runs) != dirty:
                raise SystemExit(f"runs cover {sum(n for _, n in runs)} pages, len() says {dirty}")
            vm.set_dirty_logging(region, False)
            vm.set_dirty_logging(region, True)
            t4 = time.perf_counter()
            vm.clear_dirty_log(region)
            t5 = time.perf_counter()
            if vm.get_dirty_log(region):
                raise SystemExit("pages still dirty after clearing the whole slot")
            out.append(((t1 - t0) * 1e6, (t2 - t1) * 1e6, (t3 - t2) * 1e6, (t5 - t4) * 1e6,
                        dirty, len(runs), (t1 - tp) * 1e6))
            del bitmap
        vm.remove_memory(region)
        backing.close()
        mapping.close()
    return out


RING_ENTRIES = 65536
LOGGED = 0x10000000


def build_guest(tmp: Path) -> Path:
    obj, guest = tmp / "dirty_pages.o", tmp / "dirty_pages.bin"
    subprocess.run(["as", "--64", "-o", obj, HERE.parent / "kvm_bindings/guests/dirty_pages.S"], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=0x1000", "--oformat", "binary", "-o", guest,
                    obj], check=True)
    return guest


def python_ring(kvm: Kvm, code: bytes, n: int, reps: int) -> list[tuple[float, int, int]]:
    """reps times (harvest us, entries, checksum) for a guest writing n pages."""
    out = []
    with kvm.create_vm() as vm:
        vm.enable_dirty_ring(RING_ENTRIES)
        vm.set_tss_addr(0xFFFBD000)
        vm.add_memory(0, 0x100000)
        vm.add_memory(LOGGED, 256 << 20, log_dirty=True)
        vm.memory.write(0x1000, code)
        vm.memory.write(0x2000, struct.pack(f"<I{n}I", n, *range(LOGGED, LOGGED + n * 4096, 4096)))
        vcpu = vm.create_vcpu(0)
        x86.setup_protected_mode(vcpu, vm.memory, 0x1000, gdt_addr=0x500, stack=0x8000)
        for _ in range(reps):
            e = vcpu.run()
            if e.reason.name != "IO":
                raise SystemExit(f"the ring guest stopped with {e!r}")
            t0 = time.perf_counter()
            entries = vcpu.harvest_dirty_ring()
            t1 = time.perf_counter()
            vm.reset_dirty_rings()
            out.append(((t1 - t0) * 1e6, len(entries), sum(s + o for s, o in entries)))
    return out


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f} us (spread {min(values):,.0f}..{max(values):,.0f}, n={len(values)})"


def report(what: str, c: list[float], py: list[float], target: float) -> None:
    ratio = min(py) / min(c)
    print(f"{what}: C {spread(c)}; Python {spread(py)}; Python/C = {ratio:.2f}x "
          f"(target <= {target:g}x: {'met' if ratio <= target else 'MISSED'})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gib", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ring-pages", type=int, default=RING_ENTRIES - 1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Kvm() as kvm:
        if not kvm.check_extension(Capability.MANUAL_DIRTY_LOG_PROTECT2) & \
                abi.KVM_DIRTY_LOG_INITIALLY_SET:
            print("this host has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with "
                  "KVM_DIRTY_LOG_INITIALLY_SET: nothing to measure")
            return 1
        exe = Path(tmp) / "dirty_baseline"
        subprocess.run(["gcc", "-O2", "-march=native", "-o", exe, HERE / "dirty_baseline.c"],
                       check=True)
        c_get: list[float] = []
        c_runs: list[float] = []
        c_clear: list[float] = []
        c_popcount: list[float] = []
        py: list[tuple[float, float, float, float, int, int, float]] = []
        pages = (args.gib << 30) // 4096
        for _ in range(args.rounds):
            out = subprocess.run([exe, str(args.gib), str(args.reps)], check=True,
                                 capture_output=True, text=True).stdout
            for line in out.splitlines():
                get, runs, clear, dirty, nruns, run_pages, count = line.split()
                if (int(dirty), int(nruns), int(run_pages)) != (pages, 1, pages):
                    raise SystemExit(f"C saw {dirty} dirty pages in {nruns} runs, not {pages} in 1")
                c_get.append(float(get))
                c_runs.append(float(runs))
                c_clear.append(float(clear))
                c_popcount.append(float(count))
            py += python_round(kvm, args.gib, args.reps)
        guest = build_guest(Path(tmp))
        code = guest.read_bytes()
        ring: dict[int, tuple[list[float], list[float]]] = {}
        for n in (args.ring_pages // 8, args.ring_pages):
            c_ring: list[float] = []
            py_ring: list[float] = []
            for _ in range(args.rounds):
                out = subprocess.run([exe, "ring", guest, str(n), str(args.reps + 1)], check=True,
                                     capture_output=True, text=True).stdout
                c_lines = [line.split() for line in out.splitlines()][1:]   # first: cold ring
                p_lines = python_ring(kvm, code, n, args.reps + 1)[1:]
                for (c_us, c_count, c_sum), (p_us, p_count, p_sum) in zip(c_lines, p_lines):
                    if (int(c_count), int(c_sum)) != (p_count, p_sum) or p_count != n:
                        raise SystemExit(f"C harvested {c_count} entries, Python {p_count}, of {n}")
                    c_ring.append(float(c_us))
                    py_ring.append(p_us)
            ring[n] = c_ring, py_ring
        for *_, dirty, nruns, _ in py:
            if (dirty, nruns) != (pages, 1):
                raise SystemExit(f"Python saw {dirty} dirty pages in {nruns} runs, not {pages} in 1")
    print(f"a fully dirty {args.gib} GiB slot ({pages:,} pages, a {pages // 8 // 1024} KiB bitmap); "
          f"{args.rounds} rounds x {args.reps}, best of each side")
    report("get log + len()", c_get, [p[0] for p in py], 3)
    print(f"  of which the popcount alone: C {spread(c_popcount)}; Python len() "
          f"{spread([p[6] for p in py])}")
    report("runs()", c_runs, [p[1] for p in py], 3)
    report("clear_dirty_log(region, bitmap)", c_clear, [p[2] for p in py], 2)
    report("clear_dirty_log(region) (whole slot)", c_clear, [p[3] for p in py], 2)
    for n, (c_ring, py_ring) in ring.items():
        print(f"harvest_dirty_ring(), {n:,} entries: C {spread(c_ring)}; Python {spread(py_ring)}; "
              f"Python/C = {min(py_ring) / min(c_ring):.2f}x; Python {min(py_ring) / n * 1e3:.0f} "
              f"ns per entry")
    return 0


if __name__ == "__main__":
    sys.exit(main())
