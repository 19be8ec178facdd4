"""The shipped kvm_bindings.abi: flexible arrays, import behaviour, what it lists."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from importlib import resources

import pytest

from kvm_bindings.abi import x86_64 as abi

FACTS = json.loads(resources.files("kvm_bindings.abi").joinpath("x86_64_facts.json").read_text())


def _c_offset(struct: str, member: str) -> int:
    return int(FACTS["fields"][f"struct {struct}"][member][0])


def _c_size(struct: str) -> int:
    return int(FACTS["types"][f"struct {struct}"][0])


@pytest.mark.parametrize("struct, member, entry", [
    ("kvm_msrs", "entries", "kvm_msr_entry"),
    ("kvm_cpuid2", "entries", "kvm_cpuid_entry2"),
    ("kvm_irq_routing", "entries", "kvm_irq_routing_entry"),
    ("kvm_reg_list", "reg", None),
    ("kvm_signal_mask", "sigset", None),
    ("kvm_xsave", "extra", None),
])
def test_flexible_array_entries_sit_where_c_puts_them(struct, member, entry):
    cls = getattr(abi, struct)
    obj = cls.alloc(5)
    entries = obj.flex_array(5)
    assert len(entries) == 5
    assert ctypes.addressof(entries) - ctypes.addressof(obj) == _c_offset(struct, member)
    if entry is not None:
        assert ctypes.sizeof(entries) == 5 * _c_size(entry)
    assert obj.flex_nbytes >= _c_offset(struct, member) + ctypes.sizeof(entries)
    if cls._flex_count_ is not None:
        assert getattr(obj, cls._flex_count_) == 5
        assert len(obj.flex_array()) == 5


def test_flexible_array_refuses_more_than_it_holds():
    msrs = abi.kvm_msrs.alloc(2)
    msrs.nmsrs = 3       # as if the kernel said so
    with pytest.raises(ValueError, match="room for 2"):
        msrs.flex_array()


def test_flexible_array_outlives_its_struct_reference():
    entries = abi.kvm_msrs.alloc(3).flex_array()
    entries[2].index = 0x10
    entries[2].data = 0xDEADBEEF
    assert (entries[2].index, entries[2].data) == (0x10, 0xDEADBEEF)


def test_foreign_arch_import_error_names_the_arch_but_submodules_still_import():
    code = ("import os, collections\n"
            "U = collections.namedtuple('U', 'sysname nodename release version machine')\n"
            "os.uname = lambda: U('Linux', 'h', 'r', 'v', 's390x')\n"
            "import kvm_bindings.abi.x86_64 as m\n"
            "assert m.KVM_RUN\n"
            "try:\n"
            "    from kvm_bindings.abi import kvm_regs\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'s390x'" in out.stdout and "x86_64" in out.stdout


def test_enums_are_built_on_first_use():
    code = ("import sys, kvm_bindings.abi as a\n"
            "assert 'kvm_bindings.abi.x86_64_enums' not in sys.modules\n"
            "print(a.ExitReason.IO.name, a.Capability(a.KVM_CAP_IRQCHIP).name)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["IO", "IRQCHIP"]


def test_every_generated_file_says_do_not_edit_and_where_it_came_from():
    from codegen import GENERATOR_VERSION, headers
    version = headers.shipped_version()
    for name in ("__init__.py", "x86_64.py", "x86_64_enums.py", "arm64.py", "arm64_enums.py",
                 "riscv64.py", "riscv64_enums.py"):
        text = resources.files("kvm_bindings.abi").joinpath(name).read_text()
        first = text.splitlines()[0]
        assert "DO NOT EDIT" in first and f"codegen {GENERATOR_VERSION}" in first
        head = text[:4000]
        assert f"Linux {version}" in head and "Source:" in head and "sha256" in head
        if name != "__init__.py":
            assert "linux/kvm.h" in head


def test_unexpressed_items_each_carry_a_reason_and_place():
    assert abi.UNEXPRESSED
    for name, kind, reason, where in abi.UNEXPRESSED:
        assert name and kind and len(reason) > 10 and ":" in where
