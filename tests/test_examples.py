"""Every program in examples/ runs on /dev/kvm and prints what its guest did.

The expected output is the guest's own (the string it wrote to a port, the values it
read and wrote through MMIO), so a runtime that decodes exits wrongly fails here.
"""

from __future__ import annotations

import ast
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REQUIRE_KVM, REQUIRE_TOOLS, ROOT, need

EXAMPLES = ROOT / "examples"

# What each example prints, exactly.
EXPECTED = {
    "tutorial_vmm.py": "guest wrote: 'Hello from the guest!\\n'\n",
    "mmio_device.py": ("read  0xa000 (2 bytes) -> 0x1234\n"
                       "write 0xa004 (2 bytes) <- 0x1235\n"
                       "guest halted\n"),
    "snapshot_counter.py": ("ran: [1, 2, 3], then [4, 5]\n"
                            "restored in a new VM: [4, 5, 6]\n"
                            "loaded back in place: [4, 5, 6], count in memory 6\n"),
}


# Examples whose output is someone else's software, run by their own tests.
RUN_ELSEWHERE = {
    "boot_linux.py": "tests/test_boot_guests.py (memtest86+, the Debian cloud kernel)",
    "extract_vmlinux.py": "tests/test_boot_guests.py (unpacks the kernel it boots)",
}


def example_files() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.py"))


def test_every_example_has_an_expected_output_or_its_own_test():
    assert example_files() == sorted([*EXPECTED, *RUN_ELSEWHERE])
    for name, where in RUN_ELSEWHERE.items():
        test = ROOT / where.split()[0]
        assert f'"{name}"' in test.read_text(), f"{where.split()[0]} does not run {name}"


@pytest.fixture
def host_for_examples(kvm) -> None:
    """The examples run x86 real-mode guests: /dev/kvm (the kvm fixture) on an x86_64 host."""
    need(platform.machine() == "x86_64", "the examples' guests are x86 code", False)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_prints_what_its_guest_did(name, host_for_examples, tmp_path):
    # The checkout's kvm_bindings, whatever is installed.
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    r = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == EXPECTED[name]


# Lines such as   b"\xba\xf8\x03",     # mov $0x3f8, %dx   : machine code, and its source.
_GUEST_LINE = re.compile(r'^\s*(b"(?:[^"\\]|\\.)*")\s*,\s*#\s*(.+?)\s*$')


def guest_listing(path: Path) -> tuple[bytes, list[str]]:
    """The machine code of an example's GUEST and the assembly written beside it."""
    code, source = b"", []
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("GUEST = "))
    for line in lines[start + 1:]:
        if line.startswith("])"):
            break
        m = _GUEST_LINE.match(line)
        assert m, f"{path.name}: a GUEST line without its assembly: {line!r}"
        code += ast.literal_eval(m[1])
        source.append(m[2])
    return code, source


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_guest_bytes_are_what_the_assembly_beside_them_assembles_to(name, tmp_path):
    """The comments are the guest's source: GNU as, linked at 0x1000, gives exactly the bytes."""
    need(shutil.which("as") is not None and shutil.which("ld") is not None,
         "GNU as/ld (binutils) are not installed", REQUIRE_TOOLS or REQUIRE_KVM)
    code, source = guest_listing(EXAMPLES / name)
    assert len(source) >= 4
    src = tmp_path / "guest.S"
    src.write_text("    .code16\n    .globl _start\n_start:\n" + "".join(f"    {s}\n" for s in source))
    subprocess.run(["as", "--64", "-o", str(tmp_path / "guest.o"), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=0x1000", "--oformat", "binary",
                    "-o", str(tmp_path / "guest.bin"), str(tmp_path / "guest.o")], check=True)
    assert (tmp_path / "guest.bin").read_bytes() == code


def test_tutorial_shows_every_marked_part_of_its_example():
    """docs/tutorial.rst includes each "# [name]" ... "# [/name]" part of tutorial_vmm.py."""
    source = (EXAMPLES / "tutorial_vmm.py").read_text()
    page = (ROOT / "docs" / "tutorial.rst").read_text()
    parts = re.findall(r"^\s*# \[(\w+)\]$", source, re.M)
    assert len(parts) >= 5
    for part in parts:
        assert re.search(rf"^\s*# \[/{part}\]$", source, re.M), f"# [{part}] is never closed"
        assert f":start-after: # [{part}]\n" in page and f":end-before: # [/{part}]\n" in page, part
