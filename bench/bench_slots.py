"""Memory slot allocation as slots fill: kvm_bindings' add_memory against C, in one run.

    python bench/bench_slots.py [--slots N]

Both sides add N one-page slots to one VM (default: every slot this kernel has,
KVM_CAP_NR_MEMSLOTS). C maps a page and issues KVM_SET_USER_MEMORY_REGION with the
slot number it counts; Python calls vm.add_memory(), which also picks the lowest
free slot, checks for overlaps and files the region. Reported: microseconds per
add over the first and the last tenth, for each side. The library's own part must
not grow with the slot count: target Python's last-tenth/first-tenth growth at
most 1.5x C's (what the kernel itself adds as slots fill is in both).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from kvm_bindings import Capability, Kvm  # noqa: E402

PAGE = 4096


def python_slots(kvm: Kvm, n: int) -> tuple[float, float]:
    tenth = n // 10
    with kvm.create_vm() as vm:
        t = time.perf_counter()
        for i in range(n):
            if i == n - tenth:
                t = time.perf_counter()
            vm.add_memory(i * PAGE, PAGE)
            if i + 1 == tenth:
                first = (time.perf_counter() - t) / tenth * 1e6
        last = (time.perf_counter() - t) / tenth * 1e6
    return first, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--slots", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Kvm() as kvm:
        exe = Path(tmp) / "baseline"
        subprocess.run(["gcc", "-O2", "-o", exe, HERE / "baseline.c"], check=True)
        n = args.slots or kvm.check_extension(Capability.NR_MEMSLOTS)
        out = subprocess.run([exe, "slots", "/dev/null", str(n)], check=True, capture_output=True,
                             text=True).stdout.split()
        c_first, c_last = float(out[0]), float(out[1])
        py_first, py_last = python_slots(kvm, n)
    c_growth, py_growth = c_last / c_first, py_last / py_first
    print(f"{n} slots, us per add (first tenth -> last tenth): C {c_first:.1f} -> {c_last:.1f} "
          f"({c_growth:.2f}x), Python {py_first:.1f} -> {py_last:.1f} ({py_growth:.2f}x)")
    ratio = py_growth / c_growth
    print(f"Python's growth / C's growth = {ratio:.2f}x (target <= 1.5x: "
          f"{'met' if ratio <= 1.5 else 'MISSED'}); Python/C per add at the end = "
          f"{py_last / c_last:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
