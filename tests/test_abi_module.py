"""The shipped kvm_bindings.abi: flexible arrays, import behaviour, what it lists."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

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


# ---- one support module; __all__ and dir() give the ABI, not the module's imports ----

ARCH_MODULES = ("x86_64", "arm64", "riscv64")
# What an arch module binds that is not ABI: its imports and the helpers its code uses.
NOT_ABI = {"annotations", "ctypes", "TYPE_CHECKING", "_Structure", "_Union", "_FlexibleStructure",
           "_Bitfield", "_ENUMS"}


def _arch(name: str):
    import importlib
    return importlib.import_module(f"kvm_bindings.abi.{name}")


def test_the_shared_helpers_are_one_set_of_objects_from_the_support_module():
    from kvm_bindings.abi import _plain, _support
    for name in ARCH_MODULES:
        m = _arch(name)
        assert m.to_dict is _plain.to_dict and m.from_dict is _plain.from_dict
        assert m._Structure is _support._Structure and m._Union is _support._Union
        assert m._FlexibleStructure is _support._FlexibleStructure
        assert m._Bitfield is _support._Bitfield
        assert m.Ioctl is _support.Ioctl
        assert type(m.IOCTLS["KVM_RUN"]) is _support.Ioctl
        flexible = [cls for cls in m.C_TYPES.values() if hasattr(cls, "_flex_field_")]
        assert flexible and all(issubclass(cls, _support._FlexibleStructure) for cls in flexible)
        assert all(issubclass(cls, (_support._Structure, _support._Union))
                   for cls in m.C_TYPES.values())


@pytest.mark.parametrize("name", ARCH_MODULES)
def test_an_arch_module_does_not_repeat_the_helpers_source(name):
    text = resources.files("kvm_bindings.abi").joinpath(f"{name}.py").read_text()
    for definition in ("class _Structure", "class _Union", "class _FlexibleStructure",
                       "class _Bitfield", "class Ioctl", "def alloc", "def flex_array",
                       "def __reduce__", "def to_dict", "def from_dict"):
        assert definition not in text
    assert "from ._support import Ioctl, _Bitfield, _FlexibleStructure, _Structure, _Union" in text
    assert "from ._plain import from_dict, to_dict" in text


def test_dir_of_abi_is_its_all_and_shows_no_imports():
    import kvm_bindings.abi as package
    shown = {n for n in dir(package) if not (n.startswith("__") and n.endswith("__"))}
    assert shown == set(package.__all__)
    assert not shown & {"ctypes", "annotations", "TYPE_CHECKING", "Any", "_os", "_typing",
                        "_host", "_MACHINES", "_Structure", "_Union", "_FlexibleStructure",
                        "_Bitfield"}
    assert {"ARCHES", "HOST_ARCH", "KVM_RUN", "kvm_regs", "IOCTLS", "Capability"} <= shown


@pytest.mark.parametrize("name", ARCH_MODULES)
def test_dir_of_an_arch_module_is_its_all(name):
    m = _arch(name)
    shown = {n for n in dir(m) if not (n.startswith("__") and n.endswith("__"))}
    assert shown == set(m.__all__)
    assert not shown & NOT_ABI


@pytest.mark.parametrize("name", ARCH_MODULES)
def test_all_of_an_arch_module_lists_every_abi_name_and_each_resolves(name):
    m = _arch(name)
    listed = set(m.__all__)
    assert len(listed) == len(m.__all__)
    # every name the module binds is in __all__ unless it is an import or a helper
    defined = {n for n in vars(m) if not (n.startswith("__") and n.endswith("__"))}
    assert defined - listed <= NOT_ABI
    assert {m.RENAMED.get(io, io) for io in m.IOCTLS} <= listed
    assert {cls.__name__ for cls in m.C_TYPES.values()} <= listed
    assert m._ENUMS <= listed
    assert {"KERNEL_VERSION", "ARCH", "IOCTLS", "C_TYPES", "EXIT_MEMBERS", "EMPTY_MACROS",
            "UNEXPRESSED", "RENAMED", "Ioctl"} <= listed
    unexpressed = {n for n, *_ in m.UNEXPRESSED}
    constants = {m.RENAMED.get(n, n) for n in _facts_constants(name) if n not in unexpressed}
    assert constants and constants <= listed
    for n in m.__all__:
        getattr(m, n)   # the enum classes too: each is built from the _enums module


def _facts_constants(name: str) -> list[str]:
    """The macros gcc evaluated for this arch when the module was generated."""
    facts = json.loads(resources.files("kvm_bindings.abi").joinpath(f"{name}_facts.json")
                       .read_text())
    return list(facts["constants"])


def test_all_of_abi_is_the_host_modules_plus_the_packages_own_and_each_resolves():
    import kvm_bindings.abi as package
    host = _arch(package.HOST_ARCH)
    assert package.__all__ == [*host.__all__, "ARCHES", "HOST_ARCH"]
    for n in host.__all__:
        assert getattr(package, n) is getattr(host, n)
    assert package.ARCHES == ("x86_64", "arm64", "riscv64") and package.HOST_ARCH == host.ARCH


def test_star_import_of_abi_gives_the_abi_and_none_of_its_imports():
    code = ("from kvm_bindings.abi import *\n"
            "names = set(globals())\n"
            "assert {'KVM_RUN', 'kvm_regs', 'IOCTLS', 'Capability', 'ExitReason', 'HOST_ARCH'} "
            "<= names\n"
            "assert not names & {'ctypes', 'TYPE_CHECKING', '_FlexibleStructure', '_os'}\n"
            "assert IOCTLS['KVM_RUN'].number == KVM_RUN and kvm_msrs.alloc(2).flex_capacity == 2\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n"


def test_a_generated_out_package_has_its_own_support_module(tmp_path, gcc):
    from codegen.arches import host_arch

    from .conftest import REQUIRE_TOOLS, ROOT, need
    host = host_arch()
    need(host is not None and Path("/usr/include/linux/kvm.h").exists(),
         "no /usr/include/linux/kvm.h for this host's arch", REQUIRE_TOOLS)
    assert host is not None
    out = tmp_path / "mybindings"
    proc = subprocess.run([sys.executable, "-m", "codegen", "generate", "--include-dir",
                           "/usr/include", "--arch", host.name, "--no-facts", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "_support.py").exists() and (out / "_plain.py").exists()
    # a fresh interpreter with only the output's parent on the path: the package's structs use
    # its own _support and _plain, not kvm_bindings'
    check = ("import sys\n"
             f"sys.path.insert(0, {str(tmp_path)!r})\n"
             f"import mybindings, mybindings.{host.name} as m\n"
             "assert m._FlexibleStructure.__module__ == 'mybindings._support'\n"
             "assert m.to_dict.__module__ == m.from_dict.__module__ == 'mybindings._plain'\n"
             "assert 'kvm_bindings' not in sys.modules\n"
             "msrs = mybindings.kvm_msrs.alloc(3)\n"
             "assert msrs.nmsrs == 3 and len(msrs.flex_array()) == 3\n"
             "msrs.flex_array()[2].data = 7\n"
             "assert msrs.flex_array()[2].data == 7\n"
             "assert m.to_dict(m.from_dict(m.kvm_msrs, m.to_dict(msrs))) == m.to_dict(msrs)\n"
             "assert 'ctypes' not in dir(mybindings) and 'KVM_RUN' in mybindings.__all__\n"
             "print('ok')\n")
    imp = subprocess.run([sys.executable, "-I", "-c", check], cwd=tmp_path, capture_output=True,
                         text=True)
    assert imp.returncode == 0, imp.stderr
    assert imp.stdout == "ok\n"
