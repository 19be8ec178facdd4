"""Software nobody here wrote, booted by examples/boot_linux.py: Debian's memtest86+ and
Debian's cloud kernel, fetched with apt-get at test time (cached between runs).

The oracles are the images themselves: the load address and entry come from the file's
own setup header (read here at the boot protocol's documented offsets, not through the
generated layouts), the bytes KVM reports at a stop are compared with the file's bytes at
that address, and the kernel's banner must name the version of the package it came from.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REQUIRE_KVM, REQUIRE_TOOLS, ROOT, need

EXAMPLES = ROOT / "examples"
CACHE = Path(os.environ.get("KVM_BINDINGS_GUEST_CACHE",
                            Path.home() / ".cache" / "kvm-bindings" / "guests"))
KERNEL_META = "linux-image-cloud-amd64"


def _apt(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True).stdout


def _fetch_deb(package: str) -> Path:
    """The package's .deb in CACHE: downloaded with apt-get unless a copy is there already."""
    CACHE.mkdir(parents=True, exist_ok=True)
    def cached() -> list[Path]:
        return sorted(CACHE.glob(f"{glob.escape(package)}_*.deb"))
    if cached():
        return cached()[-1]
    need(shutil.which("apt-get") is not None, "apt-get is not available to fetch Debian guests",
         REQUIRE_TOOLS or REQUIRE_KVM)
    try:
        _apt("apt-get", "download", package, cwd=CACHE)
    except subprocess.CalledProcessError as e:
        need(False, f"apt-get download {package} failed (apt-get update first?): {e.stderr}",
             REQUIRE_TOOLS or REQUIRE_KVM)
    assert cached(), f"apt-get download {package} left no .deb in {CACHE}"
    return cached()[-1]


def _unpack(deb: Path) -> Path:
    out = CACHE / deb.stem
    if not out.exists():
        need(shutil.which("dpkg-deb") is not None, "dpkg-deb is not available",
             REQUIRE_TOOLS or REQUIRE_KVM)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(out) + ".tmp"], check=True)
        os.replace(str(out) + ".tmp", out)
    return out


@pytest.fixture(scope="session")
def memtest() -> Path:
    """Debian's memtest86+ boot directory: a 64-bit and a 32-bit bzImage."""
    return _unpack(_fetch_deb("memtest86+")) / "boot"


@pytest.fixture(scope="session")
def cloud_kernel() -> tuple[Path, str]:
    """(the bzImage, its release) of the image linux-image-cloud-amd64 depends on today."""
    package = None
    if shutil.which("apt-cache"):
        depends = _apt("apt-cache", "depends", KERNEL_META)
        package = next((m.group(1) for m in re.finditer(r"Depends: (linux-image-\S+)", depends)),
                       None)
    if package is None:     # no apt here: a kernel fetched before, if any
        cached = sorted(CACHE.glob("linux-image-*-cloud-amd64_*.deb"))
        need(bool(cached), f"cannot resolve {KERNEL_META} (no apt-cache) and none is cached",
             REQUIRE_TOOLS or REQUIRE_KVM)
        package = cached[-1].name.split("_")[0]
    release = package.removeprefix("linux-image-")
    return _unpack(_fetch_deb(package)) / "boot" / f"vmlinuz-{release}", release


@pytest.fixture
def host(kvm) -> None:
    import platform
    need(platform.machine() == "x86_64", "these guests are x86-64 software", False)


def _run_example(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, errors="replace", env=env, timeout=timeout)


def _header(image: bytes) -> dict[str, int]:
    """The fields these tests need, at the offsets Documentation/arch/x86/boot.rst gives."""
    return {"setup_sects": image[0x1F1], "code32_start": struct.unpack_from("<I", image, 0x214)[0],
            "init_size": struct.unpack_from("<I", image, 0x260)[0],
            "xloadflags": struct.unpack_from("<H", image, 0x236)[0],
            "version": struct.unpack_from("<H", image, 0x206)[0]}


@pytest.mark.parametrize("image, bits", [("memtest86+x64.bin", 64), ("memtest86+ia32.bin", 32)])
def test_memtest86_is_entered_where_its_header_says_and_runs_its_own_code(host, memtest, image,
                                                                         bits):
    path = memtest / image
    data = path.read_bytes()
    hdr = _header(data)
    assert bool(hdr["xloadflags"] & 1) == (bits == 64)    # XLF_KERNEL_64: only the x64 build
    r = _run_example("boot_linux.py", str(path), "--cmdline", "console=ttyS0", "--bits", str(bits),
                     "--memory", "256", "--until", "Memtest86+", "--timeout", "60", timeout=120)
    start = hdr["code32_start"]         # not relocatable: it runs where its header says
    entry = start + (0x200 if bits == 64 else 0)
    protocol = f"{hdr['version'] >> 8}.{hdr['version'] & 0xFF:02d}"
    assert (f"loaded bzImage (protocol {protocol}) at [{start:#x}, {start + hdr['init_size']:#x}), "
            f"{bits}-bit entry {entry:#x}") in r.stderr
    if r.returncode == 0:               # a host whose KVM runs x87 code: memtest's own screen
        assert "the console printed 'Memtest86+'" in r.stderr
        return
    # This host: KVM cannot emulate memtest's first FPU instruction (finit), before any
    # output. What it reports must be memtest's own code, at an address inside the image
    # beyond the entry: the loader placed the file where the header says and entered it.
    stop = re.search(r"stopped: KVM could not emulate the instruction ([0-9a-f ]+) \(an "
                     r"emulation failure\); rip (0x[0-9a-f]+)", r.stderr)
    assert r.returncode == 2 and stop, r.stderr
    insn, rip = bytes.fromhex(stop.group(1)), int(stop.group(2), 16)
    assert entry < rip < start + hdr["init_size"]
    in_file = (hdr["setup_sects"] + 1) * 512 + (rip - start)
    assert insn == data[in_file:in_file + len(insn)] and len(insn) >= 3


@pytest.fixture(scope="session")
def vmlinux(cloud_kernel, tmp_path_factory) -> Path:
    """The cloud kernel's ELF vmlinux, extracted by examples/extract_vmlinux.py."""
    import importlib.util
    need(importlib.util.find_spec("lz4") is not None,
         "the lz4 package unpacks Debian's kernel (pip install lz4)", REQUIRE_TOOLS or REQUIRE_KVM)
    bzimage, _ = cloud_kernel
    out = tmp_path_factory.mktemp("vmlinux") / "vmlinux"
    r = _run_example("extract_vmlinux.py", str(bzimage), str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def test_debian_cloud_kernel_prints_its_banner_and_our_command_line(host, cloud_kernel, vmlinux):
    _, release = cloud_kernel
    elf = vmlinux.read_bytes()
    entry = struct.unpack_from("<Q", elf, 0x18)[0]      # e_entry: phys_startup_64
    marker = f"kvm_bindings.test={os.getpid()}"
    r = _run_example("boot_linux.py", str(vmlinux), "--cmdline",
                     f"console=ttyS0 earlyprintk=serial,ttyS0 {marker}", "--until",
                     "Command line:", "--timeout", "400", timeout=500)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"64-bit entry {entry:#x}" in r.stderr
    banner = re.search(r"Linux version (\S+)", r.stdout)
    assert banner and banner.group(1) == release
    assert f"Command line: console=ttyS0 earlyprintk=serial,ttyS0 {marker}" in r.stdout
