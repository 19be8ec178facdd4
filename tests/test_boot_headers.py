"""The x86 boot protocol (asm/bootparam.h and what it includes) in the x86_64 bindings.

The boot protocol fixes the zero page's shape (Documentation/arch/x86/zero-page.rst):
struct boot_params is one 4096-byte page, the setup header sits at 0x1f1 and the
e820 table at 0x2d0. These numbers are asserted against gcc's own sizeof/offsetof
(the probe's facts) for every pinned kernel, and the generated classes against both.
"""

from __future__ import annotations

import ctypes
import json
import shutil

import pytest

from codegen import conformance, headers, pipeline
from codegen.arches import get_arch

MANIFEST = headers.load_manifest()["versions"]
X86_VERSIONS = [v for v in headers.manifest_versions() if "x86_64" in MANIFEST[v]["arches"]]
WITH_BOOT = [v for v in X86_VERSIONS
             if "asm/bootparam.h" not in MANIFEST[v].get("left_out", {}).get("x86_64", {})]
ZERO_PAGE = {"hdr": 0x1F1, "e820_table": 0x2D0}
BOOT_TYPES = ("boot_params", "setup_header", "boot_e820_entry", "setup_data", "screen_info",
              "apm_bios_info", "edd_info", "edid_info", "ist_info")


def _zero_page_facts(facts: dict) -> tuple[int, dict[str, int]]:
    size, _align = facts["types"]["struct boot_params"]
    fields = facts["fields"]["struct boot_params"]
    return size, {name: fields[name][0] for name in ZERO_PAGE}


def test_only_4_19_26_leaves_out_the_boot_headers():
    """ziglang 0.8.1 (4.19.26) has no video/edid.h; every other pinned source has all of them."""
    assert [v for v in X86_VERSIONS if v not in WITH_BOOT] == ["4.19.26"]
    assert "video/edid.h is missing" in MANIFEST["4.19.26"]["left_out"]["x86_64"]["asm/bootparam.h"]


@pytest.mark.parametrize("version", WITH_BOOT)
def test_boot_params_is_one_page_with_hdr_at_0x1f1_and_e820_table_at_0x2d0(version, header_set,
                                                                            cross_compiler):
    cross_compiler("x86_64")
    arch = get_arch("x86_64")
    files = pipeline.generate(header_set(version), arch)
    facts = json.loads(files["x86_64_facts.json"])        # gcc's sizeof and offsetof
    assert _zero_page_facts(facts) == (4096, ZERO_PAGE)
    mod = conformance.load_generated(files, arch)
    assert ctypes.sizeof(mod.boot_params) == 4096
    assert {name: getattr(mod.boot_params, name).offset for name in ZERO_PAGE} == ZERO_PAGE
    for name in BOOT_TYPES:
        assert ctypes.sizeof(getattr(mod, name)) == facts["types"][f"struct {name}"][0], name
    for name in ("LOADED_HIGH", "CAN_USE_HEAP", "XLF_KERNEL_64", "XLF_CAN_BE_LOADED_ABOVE_4G",
                 "E820_MAX_ENTRIES_ZEROPAGE", "SETUP_NONE", "SETUP_E820_EXT"):
        assert getattr(mod, name) == facts["constants"][name], name


def test_shipped_module_has_the_zero_page_gcc_laid_out():
    """Without a compiler: the shipped module against the probe facts stored beside it."""
    from importlib import resources

    from kvm_bindings.abi import x86_64 as abi
    facts = json.loads(resources.files("kvm_bindings.abi").joinpath("x86_64_facts.json").read_text())
    assert _zero_page_facts(facts) == (4096, ZERO_PAGE)
    assert ctypes.sizeof(abi.boot_params) == 4096
    assert abi.boot_params.hdr.offset == 0x1F1 and abi.boot_params.e820_table.offset == 0x2D0
    assert len(abi.boot_params().e820_table) == abi.E820_MAX_ENTRIES_ZEROPAGE == 128
    assert {f"struct {n}" for n in BOOT_TYPES} <= set(abi.C_TYPES)
    assert abi.LOADED_HIGH == 1 and abi.XLF_KERNEL_64 == 1 == facts["constants"]["XLF_KERNEL_64"]
    # enum x86_hardware_subarch is a declared family; its sentinel is not a member
    assert abi.HardwareSubarch.SUBARCH_XEN == facts["constants"]["X86_SUBARCH_XEN"] == 2
    assert "X86_NR_SUBARCHS" not in abi.HardwareSubarch.__members__ and abi.X86_NR_SUBARCHS == 5


def test_a_version_without_the_boot_headers_lists_them_as_unexpressed(header_set, cross_compiler,
                                                                       capsys):
    from argparse import Namespace

    from codegen.__main__ import _header_sets
    cross_compiler("x86_64")
    hs = header_set("4.19.26")
    why = MANIFEST["4.19.26"]["left_out"]["x86_64"]["asm/bootparam.h"]
    assert hs.tops == ("linux/kvm.h",) and hs.left_out == (("asm/bootparam.h", why),)
    files = pipeline.generate(hs, get_arch("x86_64"), with_facts=False)
    mod = conformance.load_generated(files, get_arch("x86_64"))
    assert not hasattr(mod, "boot_params")
    assert ("asm/bootparam.h", "header", f"left out: {why}", "asm/bootparam.h:0") in mod.UNEXPRESSED
    list(_header_sets(Namespace(include_dir=None, version="4.19.26"), ["x86_64"]))
    assert "x86_64 4.19.26: left out asm/bootparam.h, " in capsys.readouterr().out


def test_an_include_dir_without_bootparam_h_is_generated_without_it_and_says_so(header_set,
                                                                                 tmp_path):
    hs = header_set(headers.shipped_version())
    folder = tmp_path / "headers"
    shutil.copytree(hs.include_dirs[0].parent, folder)
    (folder / "x86_64" / "asm" / "bootparam.h").unlink()
    got = headers.from_include_dir(folder, get_arch("x86_64"))
    assert got.tops == ("linux/kvm.h",)
    assert got.left_out == (("asm/bootparam.h", "asm/bootparam.h is missing"),)
