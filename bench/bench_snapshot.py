"""Snapshots against their floors, in one run: a big guest's save and restore against a
raw copy of its memory, and a reset loop against making a fresh VM.

    python bench/bench_snapshot.py [--mib 1024] [--rounds 3] [--resets 300]

Big guest (--mib MiB, every page written first). Each round times:

    raw copy    ctypes.memmove of the guest's memory into a fresh buffer (libc memcpy),
                allocated with MAP_POPULATE (faulting page by page costs more than the
                copy on this host: this is the faster of the two ways)
    save        vm.save_state(): every vCPU and VM-wide state, memory copied
    to_bytes    state.to_bytes(): the snapshot as bytes (sha256 of every blob)
    from_bytes  VmState.from_bytes(): every checksum checked, memory left in place
    restore     kvm.restore_vm(state): a new VM, memory copied in
    load_state  vm.load_state(state) on the restored VM: memory copied over in place
    save+write  vm.save_state().write(path, memory_path=) to /dev/shm
    read+restore      VmState.read() + restore_vm() of that: both files read in
    read+restore cow  the same with read(map_memory=True): memory mapped copy-on-write
                from the file, nothing copied

and prints each as a ratio to the raw copy (best of the rounds). Reset loop: a small
guest (64 KiB, one vCPU, in-kernel irqchip and PIT) restored from one snapshot and run
to its first exit, --resets times with restore_vm() (a new VM each time) and 10x that
with vm.load_state() (in place), against making the same VM from scratch (create,
irqchip, PIT, memory, code, vCPU, CPUID, long mode) and running it to that exit.
No target is asserted: the figures are for the README's speed table.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from kvm_bindings import Kvm, VmState, x86  # noqa: E402

MiB = 1 << 20


def timed(call: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    result = call()
    return time.perf_counter() - t, result


def assemble(name: str, tmp: Path) -> bytes:
    obj, binary = tmp / f"{name}.o", tmp / f"{name}.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(ROOT / "tests" / "guests" / f"{name}.S")],
                   check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=0x1000", "--oformat", "binary", "-o",
                    str(binary), str(obj)], check=True)
    return binary.read_bytes()


def warm_up(size: int) -> None:
    """Touch and free this much memory first. On a nested host the first touch of a page
    the outer hypervisor never gave this machine costs far more than any later one;
    without this the first round measures that, not the code."""
    for _ in range(2):
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE)
        mapping.close()


def big_guest(kvm: Kvm, mib: int, rounds: int, tmp: Path) -> None:
    size = mib * MiB
    warm_up(6 * size)
    vm = kvm.create_vm()
    vm.create_irqchip()
    vm.create_pit2()
    region = vm.add_memory(0, size)
    view = region.view()
    page = bytes(range(256)) * 16
    for off in range(0, size, 4096):
        view[off:off + 4096] = page
    vm.create_vcpu(0)
    results: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        results.setdefault(name, []).append(seconds)

    for _ in range(rounds):
        t = time.perf_counter()
        dest = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE)
        ctypes.memmove(ctypes.addressof(ctypes.c_char.from_buffer(dest)), region.host_addr, size)
        add("raw copy", time.perf_counter() - t)
        dest.close()
        seconds, state = timed(vm.save_state)
        add("save", seconds)
        seconds, data = timed(state.to_bytes)       # type: ignore[attr-defined]
        add("to_bytes", seconds)
        seconds, back = timed(lambda d=data: VmState.from_bytes(d))
        add("from_bytes", seconds)
        seconds, vm2 = timed(lambda b=back: kvm.restore_vm(b))
        add("restore", seconds)
        seconds, _ = timed(lambda v=vm2, b=back: v.load_state(b))   # type: ignore[attr-defined]
        add("load_state", seconds)
        vm2.close()                                  # type: ignore[attr-defined]
        del state, data, back
        snap, mem = tmp / "big.snap", tmp / "big.mem"
        seconds, _ = timed(lambda s=snap, m=mem: vm.save_state().write(s, memory_path=m))
        add("save+write", seconds)
        seconds, vm3 = timed(lambda s=snap: kvm.restore_vm(VmState.read(s)))
        add("read+restore", seconds)
        vm3.close()                                  # type: ignore[attr-defined]
        seconds, vm3 = timed(lambda s=snap: kvm.restore_vm(VmState.read(s, map_memory=True)))
        add("read+restore cow", seconds)
        vm3.close()                                  # type: ignore[attr-defined]
        snap.unlink()
        mem.unlink()
    vm.close()
    base = min(results["raw copy"])
    print(f"{mib} MiB guest, best of {rounds} rounds:")
    for name, times in results.items():
        best = min(times)
        print(f"  {name:16} {best * 1e3:9.1f} ms   {best / base:6.2f}x the raw copy   "
              f"({size / best / MiB:8.0f} MiB/s)")


def reset_loop(kvm: Kvm, resets: int, tmp: Path) -> None:
    code = assemble("timer_compute", tmp)

    def fresh() -> object:
        vm = kvm.create_vm()
        vm.set_tss_addr(0xFFFBD000)
        vm.create_irqchip()
        vm.create_pit2()
        vm.add_memory(0, 0x10000)
        vm.memory.write(0x1000, code)
        vcpu = vm.create_vcpu(0)
        x86.setup_long_mode(vcpu, vm.memory, 0x1000, page_tables=0x8000, gdt_addr=0x500,
                            stack=0x7000, identity_gib=4)
        return vm

    def first_exit(vm: object) -> None:
        vm.vcpus[0].run()                           # type: ignore[attr-defined]
        vm.close()                                  # type: ignore[attr-defined]

    template = fresh()
    state = VmState.from_bytes(template.save_state().to_bytes())  # type: ignore[attr-defined]
    best_fresh = best_restore = best_load = float("inf")
    vcpu = template.vcpus[0]                        # type: ignore[attr-defined]
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(resets * 10):
            template.load_state(state)              # type: ignore[attr-defined]
            vcpu.run()
        best_load = min(best_load, (time.perf_counter() - t) / (resets * 10))
        t = time.perf_counter()
        for _ in range(resets):
            first_exit(fresh())
        best_fresh = min(best_fresh, (time.perf_counter() - t) / resets)
        t = time.perf_counter()
        for _ in range(resets):
            first_exit(kvm.restore_vm(state))
        best_restore = min(best_restore, (time.perf_counter() - t) / resets)
    template.close()                                # type: ignore[attr-defined]
    print(f"reset loop, best of 3: fresh VM {1 / best_fresh:7.0f}/s ({best_fresh * 1e6:6.0f} us); "
          f"restore_vm {1 / best_restore:7.0f}/s ({best_restore * 1e6:6.0f} us, "
          f"{best_restore / best_fresh:.2f}x a fresh VM's time); load_state in place "
          f"{1 / best_load:7.0f}/s ({best_load * 1e6:6.0f} us, {best_load / best_fresh:.3f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resets", type=int, default=300)
    args = parser.parse_args()
    with Kvm() as kvm, tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        reset_loop(kvm, args.resets, Path(tmp))
        big_guest(kvm, args.mib, args.rounds, Path(tmp))


if __name__ == "__main__":
    main()
