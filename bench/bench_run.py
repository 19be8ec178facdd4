"""vCPU exit throughput and VM lifecycle latency: kvm_bindings against C, in one run.

    python bench/bench_run.py [--exits N] [--cycles M] [--rounds R]

Both sides run bench/exit_loop.S (assembled here with GNU as) on /dev/kvm:
- exits: the guest does N port writes; the host loop reads each IO exit's port
  and first data byte. Reported as exits/second; target Python >= 0.55x C.
- cycle: create a VM, 64 KiB of memory, a vCPU, run to HLT (one IO exit), close
  everything; M times. Reported per cycle; target Python <= 1.5x C.
The C baseline (bench/baseline.c) is compiled with gcc -O2 at bench time. Rounds
alternate C and Python, and the best round of each is compared.
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

from kvm_bindings import ExitReason, Kvm, x86  # noqa: E402

LOAD_ADDR = 0x1000


def build(tmp: Path) -> tuple[Path, Path]:
    obj, guest, exe = tmp / "guest.o", tmp / "guest.bin", tmp / "baseline"
    subprocess.run(["as", "--64", "-o", obj, HERE / "exit_loop.S"], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", f"-Ttext={LOAD_ADDR:#x}", "--oformat", "binary",
                    "-o", guest, obj], check=True)
    subprocess.run(["gcc", "-O2", "-o", exe, HERE / "baseline.c"], check=True)
    return guest, exe


def open_vm(kvm: Kvm, code: bytes, count: int):
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFBD000)
    vm.add_memory(0, 0x10000)
    vm.memory.write(LOAD_ADDR, code)
    vcpu = vm.create_vcpu(0)
    x86.setup_real_mode(vcpu, LOAD_ADDR)
    regs = vcpu.get_regs()
    regs.rcx = count
    vcpu.set_regs(regs)
    return vm, vcpu


def run_to_hlt(vcpu) -> tuple[int, int]:
    exits = checksum = 0
    io = ExitReason.IO
    while True:
        e = vcpu.run()
        if e.reason is io:
            checksum += e.port + e.data[0]
            exits += 1
            continue
        if e.reason is not ExitReason.HLT:
            raise RuntimeError(f"unexpected {e!r}")
        return exits, checksum


def python_exits(kvm: Kvm, code: bytes, n: int) -> tuple[float, int]:
    vm, vcpu = open_vm(kvm, code, n)
    with vm:
        t = time.perf_counter()
        exits, checksum = run_to_hlt(vcpu)
        t = time.perf_counter() - t
    return exits / t, checksum


def python_cycle(kvm: Kvm, code: bytes, m: int) -> float:
    t = time.perf_counter()
    for _ in range(m):
        vm, vcpu = open_vm(kvm, code, 1)
        with vm:
            run_to_hlt(vcpu)
    return (time.perf_counter() - t) / m * 1e6


def c_run(exe: Path, guest: Path, mode: str, n: int) -> list[str]:
    out = subprocess.run([exe, mode, guest, str(n)], check=True, capture_output=True, text=True)
    return out.stdout.split()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--exits", type=int, default=200_000)
    ap.add_argument("--cycles", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Kvm() as kvm:
        guest, exe = build(Path(tmp))
        code = guest.read_bytes()
        c_rate = py_rate = 0.0
        c_cycle = py_cycle = float("inf")
        for _ in range(args.rounds):
            rate, exits, c_sum = c_run(exe, guest, "exits", args.exits)
            c_rate = max(c_rate, float(rate))
            p_rate, p_sum = python_exits(kvm, code, args.exits)
            py_rate = max(py_rate, p_rate)
            if int(exits) != args.exits or int(c_sum) != p_sum:
                raise SystemExit("C and Python saw different exits")
            c_cycle = min(c_cycle, float(c_run(exe, guest, "cycle", args.cycles)[0]))
            py_cycle = min(py_cycle, python_cycle(kvm, code, args.cycles))
    ratio = py_rate / c_rate
    print(f"IO exits/s: C {c_rate:,.0f}, Python {py_rate:,.0f}: Python/C = {ratio:.2f}x "
          f"(target >= 0.55x: {'met' if ratio >= 0.55 else 'MISSED'})")
    lat = py_cycle / c_cycle
    print(f"VM create+memory+vCPU+run-to-HLT+close: C {c_cycle:.0f} us, Python {py_cycle:.0f} us: "
          f"Python/C = {lat:.2f}x (target <= 1.5x: {'met' if lat <= 1.5 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
