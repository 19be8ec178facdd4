"""generate/probe --include-dir: the arches the directory has, written as an importable package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from codegen import headers
from codegen.arches import ARCHES, host_arch
from codegen.errors import GeneratorError

from .conftest import REQUIRE_TOOLS, ROOT, need

SYSTEM = Path("/usr/include")


def _codegen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "codegen", *args], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.fixture
def system_arch(gcc) -> str:
    """The host's arch, whose asm/ Debian's linux-libc-dev puts in /usr/include."""
    need((SYSTEM / "linux" / "kvm.h").exists(), "no /usr/include/linux/kvm.h (linux-libc-dev)",
         REQUIRE_TOOLS)
    host = host_arch()
    need(host is not None, "this host's arch is not one codegen targets", REQUIRE_TOOLS)
    assert host is not None
    return host.name


def test_a_system_include_dir_has_only_the_hosts_asm(system_arch):
    assert headers.include_dir_arches(SYSTEM) == [system_arch]
    other = next(a for a in ARCHES.values() if a.name != system_arch)
    with pytest.raises(GeneratorError, match=f"no asm/kvm.h for {other.name} .*the arches it has: "
                                             f"{system_arch}"):
        headers.from_include_dir(SYSTEM, other)


def test_generate_without_arch_writes_the_hosts_arch_as_an_importable_package(system_arch, tmp_path):
    out = tmp_path / "mybindings"
    proc = _codegen("generate", "--include-dir", str(SYSTEM), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"/usr/include has asm/kvm.h for {system_arch} only: generating {system_arch}" \
        in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["__init__.py", "_plain.py", "_support.py", f"{system_arch}.py", f"{system_arch}_enums.py",
         f"{system_arch}_facts.json"])
    # a fresh interpreter with only the output's parent on the path: the package, the host
    # re-export, the arch module by name, and every enum class built from its _enums module
    check = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        f"import mybindings, mybindings.{system_arch} as m\n"
        f"assert mybindings.ARCHES == ({system_arch!r},) and mybindings.ARCH == {system_arch!r}\n"
        "assert mybindings.KERNEL_VERSION == m.KERNEL_VERSION\n"
        "assert mybindings.KVM_RUN == m.KVM_RUN and mybindings.kvm_regs is m.kvm_regs\n"
        "assert int(mybindings.ExitReason.HLT) == m.KVM_EXIT_HLT\n"
        "built = [getattr(m, n) for n in sorted(m._ENUMS)]\n"
        "assert len(built) > 5 and all(len(e) > 0 for e in built)\n"
        "print(len(built), 'enums')\n"
    )
    imp = subprocess.run([sys.executable, "-I", "-c", check], cwd=tmp_path, capture_output=True,
                         text=True)
    assert imp.returncode == 0, imp.stderr
    assert imp.stdout.endswith(" enums\n")


def test_probe_without_arch_checks_the_same_arches_as_generate(system_arch):
    proc = _codegen("probe", "--include-dir", str(SYSTEM))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    note, *lines = proc.stdout.splitlines()
    assert note == f"/usr/include has asm/kvm.h for {system_arch} only: probing {system_arch} " \
                   "(choose with --arch)"
    assert len(lines) == 1 and lines[0].startswith(f"{system_arch} Linux ")
    assert lines[0].endswith("; 0 mismatches")


def test_generate_for_a_version_without_riscv64_does_its_pinned_arches(header_set, tmp_path):
    header_set("4.19.26")
    out = tmp_path / "abi419"
    proc = _codegen("generate", "--version", "4.19.26", "--no-facts", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "kernel 4.19.26 is pinned for x86_64, arm64 only: generating x86_64, arm64" in proc.stdout
    assert sorted(p.name for p in out.glob("*.py")) == [
        "__init__.py", "_plain.py", "_support.py", "arm64.py", "arm64_enums.py", "x86_64.py",
        "x86_64_enums.py"]
    asked = _codegen("generate", "--version", "4.19.26", "--arch", "riscv64", "--out", str(out))
    assert asked.returncode == 1 and "4.19.26 in the manifest has no headers for riscv64" in asked.stderr


@pytest.mark.parametrize("command", ["generate", "probe"])
def test_help_says_what_arch_is_the_default(command):
    proc = _codegen(command, "--help")
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    assert "default: every arch the headers have" in text
    assert "with --include-dir those whose asm/kvm.h it holds" in text
