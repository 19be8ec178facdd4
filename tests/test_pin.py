"""python -m codegen pin: every arch the kernel has, or a failure naming what is missing."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from codegen import fetch, headers
from codegen.arches import ARCHES
from codegen.errors import GeneratorError

from .conftest import REQUIRE_TOOLS, need

INC = fetch.ZIG_INCLUDE
# linux/version.h of 4.19.26 as ziglang 0.8 ships it: only LINUX_VERSION_CODE
VERSION_H = "#define LINUX_VERSION_CODE 267034\n"


def _fake_wheel(tmp_path: Path, arch_dirs: list[str], version_h: str = VERSION_H,
                extra: dict[str, str] | None = None) -> Path:
    """A ziglang-like wheel: any-linux-any/ plus an asm/kvm.h in each of arch_dirs.

    extra: more files, {path under lib/libc/include: text}.
    """
    wheel = tmp_path / "ziglang-0.0.1-py3-none-manylinux_2_12_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in (extra or {}).items():
            z.writestr(f"{INC}{name}", text)
        z.writestr(f"{INC}any-linux-any/linux/version.h", version_h)
        z.writestr(f"{INC}any-linux-any/linux/kvm.h",
                   "#include <linux/types.h>\n#include <asm/kvm.h>\nstruct kvm_x { int a; };\n")
        z.writestr(f"{INC}any-linux-any/linux/types.h", "#include <asm/types.h>\n")
        z.writestr(f"{INC}any-linux-any/asm/types.h", "typedef unsigned int __u32;\n")
        for d in arch_dirs:
            z.writestr(f"{INC}{d}/asm/kvm.h", f"/* {d} */\nstruct kvm_regs {{ int r; }};\n")
        z.writestr(f"{INC}mips-linux-any/asm/unistd.h", "\n")   # an arch we do not target
    return wheel


@pytest.fixture
def manifest(tmp_path, monkeypatch):
    """pin() writes to a copy of the manifest, never the real one."""
    path = tmp_path / "manifest.json"
    path.write_text(headers.MANIFEST.read_text())
    monkeypatch.setattr(fetch, "MANIFEST", path)
    return path


@pytest.fixture
def wheel_source(tmp_path, monkeypatch):
    """use(arch_dirs): make pin's PyPI download hand over a fake wheel with those folders."""
    def use(arch_dirs: list[str], version_h: str = VERSION_H,
            extra: dict[str, str] | None = None) -> Path:
        src = tmp_path / "src"
        src.mkdir(exist_ok=True)
        wheel = _fake_wheel(src, arch_dirs, version_h, extra)

        def download(package: str, version: str, dest: Path) -> Path:
            return wheel
        monkeypatch.setattr(fetch, "_pip_download", download)
        return wheel
    return use


def test_zig_folder_names_of_every_release_map_to_our_arches():
    # ziglang 0.8.x
    old = {"x86_64-linux-any": True, "aarch64-linux-any": True, "riscv64-linux-any": False,
           "i386-linux-any": True}
    assert fetch.zig_arch_dirs(old) == {"x86_64": "x86_64-linux-any", "arm64": "aarch64-linux-any",
                                        "riscv64": "riscv64-linux-any"}
    # ziglang 0.9.0
    mid = {"x86-linux-any": True, "arm64-linux-any": True, "riscv64-linux-any": True}
    assert fetch.zig_arch_dirs(mid) == {"x86_64": "x86-linux-any", "arm64": "arm64-linux-any",
                                        "riscv64": "riscv64-linux-any"}
    # ziglang 0.9.1 and later
    new = {"x86-linux-any": True, "aarch64-linux-any": True, "riscv-linux-any": True}
    assert fetch.zig_arch_dirs(new) == {"x86_64": "x86-linux-any", "arm64": "aarch64-linux-any",
                                        "riscv64": "riscv-linux-any"}
    # where two names are present, the one with an asm/kvm.h wins
    both = {"aarch64-linux-any": False, "arm64-linux-any": True}
    assert fetch.zig_arch_dirs(both) == {"arm64": "arm64-linux-any"}


def test_pin_fails_naming_the_missing_arches_and_the_folders_it_found(manifest, wheel_source):
    before = manifest.read_text()
    wheel_source(["x86-linux-any"])
    with pytest.raises(GeneratorError) as e:
        fetch.pin("4.19.26", pypi="ziglang==0.0.1", force=True)
    msg = e.value.message
    assert "no asm/kvm.h for arm64" in msg and "riscv64" not in msg.split("(looked")[0]
    assert "aarch64-linux-any" in msg and "arm64-linux-any" in msg       # where it looked
    assert "the folders it has: mips-linux-any, x86-linux-any" in msg    # what it found
    assert manifest.read_text() == before


def test_pin_wants_riscv64_from_5_16(manifest, wheel_source):
    wheel_source(["x86-linux-any", "aarch64-linux-any"], "#define LINUX_VERSION_CODE 331778\n")
    with pytest.raises(GeneratorError, match="no asm/kvm.h for riscv64 "):
        fetch.pin("5.16.2", pypi="ziglang==0.0.1", force=True)


def test_pin_records_the_arches_the_kernel_has_with_old_zig_names(manifest, wheel_source, gcc):
    wheel = wheel_source(["x86_64-linux-any", "aarch64-linux-any"])
    entry = fetch.pin("4.19.26", pypi="ziglang==0.0.1", force=True)
    assert entry["arches"] == ["x86_64", "arm64"]
    assert entry["source"]["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert {"x86_64/asm/kvm.h", "arm64/asm/kvm.h", "common/linux/kvm.h"} <= entry["files"].keys()
    assert json.loads(manifest.read_text())["versions"]["4.19.26"] == entry


BOOTPARAM = {"x86-linux-any/asm/bootparam.h":
             "#include <linux/types.h>\n#include <video/edid.h>\nstruct boot_params { int x; };\n"}


def test_pin_takes_the_x86_boot_headers_and_everything_they_include(manifest, wheel_source, gcc):
    wheel_source(["x86-linux-any"], extra={**BOOTPARAM, "any-linux-any/video/edid.h": "\n"})
    entry = fetch.pin("4.19.26", pypi="ziglang==0.0.1", arches=["x86_64"], force=True)
    assert {"x86_64/asm/bootparam.h", "common/video/edid.h"} <= entry["files"].keys()
    assert "left_out" not in entry


def test_pin_leaves_out_a_boot_header_whose_include_the_source_lacks_and_says_why(
        manifest, wheel_source, gcc):
    wheel_source(["x86-linux-any"], extra=BOOTPARAM)
    entry = fetch.pin("4.19.26", pypi="ziglang==0.0.1", arches=["x86_64"], force=True)
    assert not any("bootparam" in f for f in entry["files"])
    assert entry["left_out"] == {"x86_64": {"asm/bootparam.h": "PyPI ziglang==0.0.1: video/edid.h "
                                            "is missing (asm/bootparam.h:2 includes it)"}}
    assert "common/linux/kvm.h" in entry["files"]        # the KVM headers are pinned all the same


def test_pin_takes_only_the_arches_asked_for(manifest, wheel_source, gcc):
    wheel_source(["x86-linux-any"])
    entry = fetch.pin("4.19.26", pypi="ziglang==0.0.1", arches=["x86_64"], force=True)
    assert entry["arches"] == ["x86_64"]
    assert not any(f.startswith("arm64/") for f in entry["files"])


def test_pin_refuses_to_overwrite_a_pin_without_force(manifest, wheel_source, gcc):
    wheel_source(["x86-linux-any", "aarch64-linux-any"])
    before = manifest.read_text()
    with pytest.raises(GeneratorError, match="already pinned to PyPI ziglang==0.8.1.*--force"):
        fetch.pin("4.19.26", pypi="ziglang==0.0.1")
    assert manifest.read_text() == before
    entry = fetch.pin("4.19.26", pypi="ziglang==0.0.1", force=True)
    assert json.loads(manifest.read_text())["versions"]["4.19.26"]["source"] == entry["source"]
    assert entry["source"]["version"] == "0.0.1"


def test_pin_cli_has_force_and_refuses_without_it(manifest, monkeypatch, capsys):
    from codegen.__main__ import main

    def no_download(*a):
        raise AssertionError("pin must refuse before downloading anything")
    monkeypatch.setattr(fetch, "_pip_download", no_download)
    assert main(["pin", "7.2.0", "--pypi", "ziglang==0.17.0"]) == 1
    assert "already pinned" in capsys.readouterr().err


def test_every_pinned_version_has_exactly_the_arches_its_kernel_has_kvm_on():
    versions = headers.load_manifest()["versions"]
    assert versions["4.19.26"]["arches"] == ["x86_64", "arm64"]
    assert versions["4.19.26"]["source"]["version"].startswith("0.8.")
    for version, entry in versions.items():
        assert entry["arches"] == [a.name for a in ARCHES.values() if a.has_kvm(version)], version


def test_the_real_ziglang_0_8_wheel_pins_4_19_26_with_its_old_folder_names(manifest):
    """Repins 4.19.26 from PyPI (pip's cache) and must reproduce the manifest's entry."""
    try:
        entry = fetch.pin("4.19.26", pypi="ziglang==0.8.1", force=True)
    except GeneratorError as e:
        need(False, f"ziglang 0.8.1 not downloadable: {e}", REQUIRE_TOOLS)
    assert entry == headers.load_manifest()["versions"]["4.19.26"]


def test_conformance_and_diff_cover_4_19_26_on_its_arches_only():
    from .test_conformance import MATRIX
    from .test_diff import PAIRS
    assert ("4.19.26", "x86_64") in MATRIX and ("4.19.26", "arm64") in MATRIX
    assert ("4.19.26", "riscv64") not in MATRIX
    for arch in ("x86_64", "arm64"):
        assert ("4.19.26", "5.16.2", arch) in PAIRS and ("4.19.26", "7.2.0", arch) in PAIRS
    assert not [p for p in PAIRS if p[2] == "riscv64" and "4.19.26" in p]
    assert ("5.16.2", "7.2.0", "riscv64") in PAIRS
