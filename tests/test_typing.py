"""What a VMM author's type checker sees: user code with planted mistakes, checked by mypy
and pyright; each mistake must be reported on its own line, and nothing else.

The sample marks each line that must fail with `# E: <text the message contains>` and
each reveal_type with `# R: <the type>`. A method that returns Any, an exit class the
checker cannot see, or a struct field the generated class does not annotate makes a
planted mistake pass silently, and the test fails.

One mistake the checkers cannot see: a misspelt struct field (regs.rpi). typeshed gives
ctypes.Structure a __getattr__/__setattr__ taking any name, so both accept it; at run
time the generated structs have no __dict__, and the misspelling is an AttributeError
(tests/test_abi_types.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = '''\
from kvm_bindings import Exit, HltExit, IoExit, Kvm, MmioExit, abi
from kvm_bindings.x86 import setup_real_mode


def main() -> None:
    with Kvm() as kvm:
        reveal_type(kvm)  # R: X86Kvm
        n: int = kvm.max_vcpus  # E: Callable[[], int]|() -> int
        with kvm.create_vm() as vm:
            reveal_type(vm)  # R: X86Vm
            region = vm.add_memory(0, 0x10000)
            reveal_type(region)  # R: MemoryRegion
            vm.add_memry(0x10000, 0x1000)  # E: add_memry
            vm.add_memory("0x20000", 0x1000)  # E: "str"|Literal['0x20000']
            vcpu = vm.create_vcpu(0)
            reveal_type(vcpu)  # R: X86Vcpu
            setup_real_mode(vcpu, 0x1000)
            regs = vcpu.get_regs()
            reveal_type(regs)  # R: kvm_regs
            regs.rip = "0x1000"  # E: "str"|Literal['0x1000']
            vcpu.set_regs(vcpu.get_sregs())  # E: kvm_sregs
            sregs = vcpu.get_sregs()
            reveal_type(sregs.cs)  # R: kvm_segment
            reveal_type(sregs.cs.selector)  # R: int
            exit = vcpu.run()
            reveal_type(exit)  # R: Exit
            if isinstance(exit, IoExit):
                reveal_type(exit.port)  # R: int
                exit.prot  # E: prot
            elif isinstance(exit, MmioExit):
                reveal_type(exit.phys_addr)  # R: int
            elif isinstance(exit, HltExit):
                exit.port  # E: port
            vcpu.set_mp_state("runnable")  # E: "str"|Literal['runnable']
            reveal_type(vcpu.get_mp_state())  # R: MpState
            reveal_type(abi.KVM_RUN)  # R: "int"|Literal[
            cpuid = kvm.get_supported_cpuid()
            reveal_type(cpuid)  # R: kvm_cpuid2
            msrs = vcpu.get_msrs([0x10])
            reveal_type(msrs)  # R: dict[int, int]
            check: Exit = exit
'''


def _expectations(sample: str) -> tuple[dict[int, str], dict[int, str]]:
    errors, reveals = {}, {}
    for number, line in enumerate(sample.splitlines(), 1):
        if m := re.search(r"# E: (.*)$", line):
            errors[number] = m.group(1).strip()
        if m := re.search(r"# R: (.*)$", line):
            reveals[number] = m.group(1).strip()
    return errors, reveals


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if path is None:
        if os.environ.get("KVM_BINDINGS_REQUIRE_TOOLS"):
            pytest.fail(f"{name} is not installed (pip install -e '.[lint]')")
        pytest.skip(f"{name} is not installed")
    return path


def _check(found_errors: dict[int, list[str]], found_reveals: dict[int, str]) -> None:
    errors, reveals = _expectations(SAMPLE)
    missed = {n: want for n, want in errors.items()
              if not any(alt in msg for alt in want.split("|") for msg in found_errors.get(n, []))}
    extra = {n: msgs for n, msgs in found_errors.items() if n not in errors}
    assert not missed, f"planted mistakes not reported: {missed}; reported: {found_errors}"
    assert not extra, f"errors on correct lines: {extra}"
    wrong = {n: (want, found_reveals.get(n)) for n, want in reveals.items()
             if not any(alt in (found_reveals.get(n) or "") for alt in want.split("|"))}
    assert not wrong, f"revealed types differ (want, got): {wrong}"


def test_mypy_reports_each_planted_mistake_and_reveals_the_concrete_types(tmp_path):
    mypy = _tool("mypy")
    (tmp_path / "sample.py").write_text(SAMPLE)
    proc = subprocess.run(
        [mypy, "--strict", "--no-error-summary", "--show-error-codes",
         "--cache-dir", str(tmp_path / "cache"), "sample.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "MYPYPATH": str(ROOT)})
    assert proc.returncode in (0, 1), proc.stderr
    found_errors: dict[int, list[str]] = {}
    found_reveals: dict[int, str] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"sample\.py:(\d+): (error|note): (.*)$", line)
        if not m:
            continue
        number, kind, message = int(m.group(1)), m.group(2), m.group(3)
        if kind == "note" and message.startswith("Revealed type is"):
            found_reveals[number] = message
        elif kind == "error":
            found_errors.setdefault(number, []).append(message)
    assert found_reveals, proc.stdout        # mypy ran on the sample at all
    _check(found_errors, found_reveals)


def test_pyright_reports_each_planted_mistake_and_reveals_the_concrete_types(tmp_path):
    pyright = _tool("pyright")
    (tmp_path / "sample.py").write_text(SAMPLE)
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(
        {"extraPaths": [str(ROOT)], "typeCheckingMode": "strict", "pythonVersion": "3.11",
         "reportUnusedExpression": False, "reportUnusedVariable": False}))
    proc = subprocess.run([pyright, "--outputjson", "sample.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    report = json.loads(proc.stdout)
    found_errors: dict[int, list[str]] = {}
    found_reveals: dict[int, str] = {}
    for diag in report["generalDiagnostics"]:
        number = diag["range"]["start"]["line"] + 1
        if diag["severity"] == "information" and "Type of" in diag["message"]:
            found_reveals[number] = diag["message"]
        elif diag["severity"] == "error":
            found_errors.setdefault(number, []).append(diag["message"])
    assert found_reveals, proc.stdout
    _check(found_errors, found_reveals)


ARM64_SAMPLE = '''\
from kvm_bindings import Kvm, abi

with Kvm() as kvm:
    vm = kvm.create_vm(ipa_bits=40)
    reveal_type(vm)  # R: Arm64Vm
    vcpu = vm.create_vcpu(0)
    reveal_type(vcpu)  # R: Arm64Vcpu
    vcpu.vcpu_init(features=[abi.KVM_ARM_VCPU_PSCI_0_2])
    reveal_type(vcpu.get_core_reg("pc"))  # R: int
    vcpu.get_regs()  # E: get_regs
'''


def test_mypy_told_the_machine_is_arm64_sees_the_arm64_classes(tmp_path):
    """The host classes follow the same switch as kvm_bindings.abi: an arm64 user's checker
    offers vcpu_init and refuses the x86-only get_regs."""
    mypy = _tool("mypy")
    (tmp_path / "sample.py").write_text(ARM64_SAMPLE)
    (tmp_path / "mypy.ini").write_text("[mypy]\nalways_true = KVM_BINDINGS_TYPING_ARM64\n")
    proc = subprocess.run(
        [mypy, "--strict", "--no-error-summary", "--config-file", "mypy.ini",
         "--cache-dir", str(tmp_path / "cache"), "sample.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "MYPYPATH": str(ROOT)})
    errors, reveals = _expectations(ARM64_SAMPLE)
    lines = proc.stdout.splitlines()
    for number, want in reveals.items():
        assert any(line.startswith(f"sample.py:{number}: note: Revealed type is") and want in line
                   for line in lines), (number, want, proc.stdout)
    for number, want in errors.items():
        assert any(line.startswith(f"sample.py:{number}: error") and want in line
                   for line in lines), (number, want, proc.stdout)
    assert sum(": error" in line for line in lines) == len(errors), proc.stdout
