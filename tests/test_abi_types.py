"""The generated classes' annotations say what ctypes really gives, and mypy agrees.

The oracle is ctypes itself: the members it exposes on a class (the descriptors it
made from _fields_ and lifted from _anonymous_ members) and the values it returns
for them on a zeroed instance. The annotations are read the way a type checker reads
them (the class body's source, `if TYPE_CHECKING:` blocks included) and the way
Python keeps them (__annotations__), and mypy is asked what it makes of each member.
"""

from __future__ import annotations

import ast
import copy
import ctypes
import importlib
import inspect
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from codegen import conformance, headers, pipeline
from codegen.arches import get_arch
from kvm_bindings.abi import x86_64

from .conftest import ROOT

ARCHES = ("x86_64", "arm64", "riscv64")
HERE = Path(__file__).resolve().parent


class _Probe(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int)]


_CFIELD = type(_Probe.x)   # the descriptor ctypes makes for each member it exposes


# ---- the modules under test: the shipped ones, every pinned generation, the corners ----

def _shipped(arch: str) -> tuple[types.ModuleType, str]:
    mod = importlib.import_module(f"kvm_bindings.abi.{arch}")
    return mod, Path(mod.__file__).read_text()


def _generated(hs: headers.HeaderSet, arch: str) -> tuple[types.ModuleType, str]:
    files = pipeline.generate(hs, get_arch(arch), with_facts=False)
    return conformance.load_generated(files, get_arch(arch)), files[f"{arch}.py"]


@pytest.fixture(scope="module")
def corners(header_set):
    """tests/headers: bitfields ctypes cannot place (properties), __int128, pointers, char."""
    real = header_set(headers.shipped_version())
    hs = headers.HeaderSet("synthetic", (HERE / "headers", *real.include_dirs), "tests/headers")
    return _generated(hs, "x86_64")


def _pinned() -> list[tuple[str, str]]:
    manifest = headers.load_manifest()["versions"]
    return [(v, a) for v in manifest for a in ARCHES if a in manifest[v].get("arches", ARCHES)]


# ---- what ctypes exposes, and what the module annotates ----

def _records(mod: types.ModuleType) -> list[type]:
    return [v for v in vars(mod).values() if isinstance(v, type) and v.__module__ == mod.__name__
            and issubclass(v, (ctypes.Structure, ctypes.Union))]


def _exposed(cls: type) -> set[str]:
    """The members ctypes lets you read on an instance, not the anonymous containers."""
    fields = {n for n, v in vars(cls).items() if isinstance(v, _CFIELD)}
    return fields - set(vars(cls).get("_anonymous_", ()))


def _bitfields(cls: type) -> set[str]:
    """Bitfields the generator places itself: descriptors of the support module."""
    return {n for n, v in vars(cls).items() if type(v).__name__ == "_Bitfield"}


def _source_annotations(source: str) -> dict[str, dict[str, str]]:
    """{class: {member: annotation}} as a type checker reads the class bodies."""
    out: dict[str, dict[str, str]] = {}

    def collect(body: list[ast.stmt], into: dict[str, str]) -> None:
        for st in body:
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                into[st.target.id] = ast.unparse(st.annotation)
            elif isinstance(st, ast.If) and ast.unparse(st.test) == "TYPE_CHECKING":
                collect(st.body, into)

    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            collect(node.body, out.setdefault(node.name, {}))
    return out


def _mangles(name: str) -> bool:
    return name.startswith("__") and not name.endswith("__")


def _conforms_ctype(ctype: type, hint: object) -> bool:
    """Is `ctype` (a ctypes type) the type `hint` names? Arrays down to their elements."""
    if typing.get_origin(hint) is ctypes.Array:
        return issubclass(ctype, ctypes.Array) and _conforms_ctype(ctype._type_,
                                                                   typing.get_args(hint)[0])
    return ctype is hint


def _conforms(value: object, hint: object) -> bool:
    """Is `value`, read from a member, of the type `hint` (an evaluated annotation)?"""
    if isinstance(hint, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is ctypes.Array:
        return isinstance(value, ctypes.Array) and _conforms_ctype(type(value), hint)
    return type(value) is hint   # exactly: a bool is an int, but not what `int` promises


def check_annotations(mod: types.ModuleType, source: str) -> None:
    static = _source_annotations(source)
    records = _records(mod)
    assert records
    for cls in records:
        name = cls.__name__
        exposed = _exposed(cls)
        # (a) every member ctypes exposes is annotated, and nothing else is
        assert set(static[name]) == exposed, name
        assert not _bitfields(cls) & exposed, name
        # ... and Python keeps each annotation under the member's own name, not a mangled one
        kept = set(inspect.get_annotations(cls))
        assert kept == {n for n in exposed if not _mangles(n)}, name
        typing.get_type_hints(cls)   # every annotation, the bases' too, evaluates at run time
        # (b) what ctypes returns for each is of the annotated type
        obj = cls()
        for member, ann in static[name].items():
            hint = eval(ann, vars(mod))
            value = getattr(obj, member)
            assert _conforms(value, hint), f"{name}.{member}: {ann}, but ctypes gives {value!r}"
        for member in _bitfields(cls):
            assert type(getattr(obj, member)) is int, f"{name}.{member}"


def check_flexible_types(mod: types.ModuleType) -> None:
    """The entry type a type checker sees (the base's parameter) is the one alloc() uses."""
    flexible = [cls for cls in _records(mod) if hasattr(cls, "_flex_field_")]
    assert flexible
    for cls in flexible:
        (param,) = typing.get_args(cls.__orig_bases__[0])
        if isinstance(param, typing.ForwardRef):
            param = eval(param.__forward_arg__, vars(mod))
        assert param is cls._flex_type_, cls.__name__


@pytest.mark.parametrize("arch", ARCHES)
def test_shipped_annotations_are_what_ctypes_gives(arch):
    mod, source = _shipped(arch)
    check_annotations(mod, source)
    check_flexible_types(mod)


def test_corner_case_annotations_are_what_ctypes_gives(corners):
    mod, source = corners
    assert _bitfields(mod.t_bits)     # the corners do exercise the generator's own bitfields
    check_annotations(mod, source)


@pytest.mark.parametrize("version, arch", _pinned())
def test_every_pinned_generation_annotates_what_ctypes_gives(header_set, version, arch):
    mod, source = _generated(header_set(version, arch), arch)
    check_annotations(mod, source)
    check_flexible_types(mod)


# ---- mypy: --strict on the ABI, the arch it picks, and what it reads for each member ----

def _mypy(tmp: Path, args: list[str], config: str = "", mypypath: list[Path] = ()) -> str:
    cfg = tmp / "mypy.ini"
    cfg.write_text(f"[mypy]\nstrict = True\n{config}")
    env = {**os.environ, "MYPYPATH": os.pathsep.join(str(p) for p in (ROOT, *mypypath))}
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(cfg), "--cache-dir",
                           str(tmp / ".mypy_cache"), *args], cwd=tmp, env=env, capture_output=True,
                          text=True)
    return f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def mypy_dir(tmp_path_factory):
    pytest.importorskip("mypy")
    return tmp_path_factory.mktemp("mypy")   # one cache for these tests: the ABI is checked once


def test_the_generated_abi_passes_mypy_strict(mypy_dir):
    out = _mypy(mypy_dir, [str(ROOT / "kvm_bindings" / "abi")])
    assert out.startswith("exit 0\n"), out
    assert "Success" in out


def test_the_projects_mypy_settings_cover_the_abi():
    tomllib = pytest.importorskip("tomllib")
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert mypy.get("strict") is True and "kvm_bindings" in mypy["files"]
    assert not mypy.get("exclude")
    assert not [o for o in mypy.get("overrides", []) if o.get("ignore_errors")]


_SAMPLE = """\
from kvm_bindings import abi
reveal_type(abi.kvm_regs)
reveal_type(abi.KVM_ARM_VCPU_INIT)
reveal_type(abi.KVM_REG_RISCV_CORE)
reveal_type(abi.kvm_msrs.alloc(2).flex_array())
"""


@pytest.mark.parametrize("flag, arch", [
    (None, "x86_64"),
    ("KVM_BINDINGS_TYPING_ARM64", "arm64"),
    ("KVM_BINDINGS_TYPING_RISCV64", "riscv64"),
])
def test_type_checkers_see_x86_64_unless_told_another_arch(mypy_dir, flag, arch):
    (mypy_dir / "sample.py").write_text(_SAMPLE)
    out = _mypy(mypy_dir, ["sample.py"], f"always_true = {flag}\n" if flag else "")
    # only sample.py's lines: the runtime modules mypy follows from kvm_bindings are not on trial
    out = "\n".join(line for line in out.splitlines() if line.startswith("sample.py:"))
    assert re.search(rf'^sample\.py:2: note: Revealed type is "def \(.*\) -> '
                     rf'kvm_bindings\.abi\.{arch}\.kvm_regs"$', out, re.M), out
    # a name only one arch has exists for that arch alone: one module, not the union of three
    for line, only_on in ((3, "arm64"), (4, "riscv64")):
        if arch == only_on:
            assert re.search(rf'^sample\.py:{line}: note: Revealed type is "(builtins\.)?int"$',
                             out, re.M), out
        else:
            assert f"sample.py:{line}: error: Module has no attribute" in out
    if arch == "x86_64":
        assert re.search(r'^sample\.py:5: note: Revealed type is '
                         r'"_?ctypes\.Array\[kvm_bindings\.abi\.x86_64\.kvm_msr_entry\]"$', out, re.M)
    else:   # x86's kvm_msrs is not there either
        assert "sample.py:5: error: Module has no attribute" in out


def _parse_revealed(text: str) -> object:
    """mypy's spelling of a type -> the object it names: a class, None, ("array", element)
    or frozenset for a union."""
    if " | " in text:
        return frozenset(_parse_revealed(p) for p in text.split(" | "))
    if text == "None":
        return None
    m = re.fullmatch(r"_?ctypes\.Array\[(.*)\]", text)
    if m:
        return ("array", _parse_revealed(m.group(1)))
    parts = text.split(".")
    if len(parts) == 1:
        parts = ["builtins", text]
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None:
            obj: object = module
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            return obj
    raise AssertionError(f"cannot resolve mypy's {text!r}")


def _reveals(value: object, revealed: object) -> bool:
    """Does mypy's type for a member describe `value`, what ctypes returned for it?"""
    if value is None:                    # a pointer: ctypes gives None for NULL, else an int
        return revealed == frozenset({int, None})
    if isinstance(value, ctypes.Array):
        return _reveals_ctype(type(value), revealed)
    return revealed is type(value)


def _reveals_ctype(ctype: type, revealed: object) -> bool:
    if isinstance(revealed, tuple):
        return issubclass(ctype, ctypes.Array) and _reveals_ctype(ctype._type_, revealed[1])
    return ctype is revealed


def test_mypy_reads_every_member_as_the_type_ctypes_gives(mypy_dir, corners):
    corner_mod, _ = corners
    modules = [_shipped(a)[0] for a in ARCHES] + [corner_mod]
    lines = ["import " + ", ".join(m.__name__ for m in modules)]
    where: dict[int, tuple[object, str]] = {}
    for mod in modules:
        source = Path(mod.__file__).read_text()
        for cls_name, members in _source_annotations(source).items():
            cls = getattr(mod, cls_name)
            obj = cls()
            for member in sorted(set(members) | _bitfields(cls)):
                lines.append(f"reveal_type({mod.__name__}.{cls_name}().{member})")
                where[len(lines)] = (getattr(obj, member), f"{mod.__name__}.{cls_name}.{member}")
    (mypy_dir / "members.py").write_text("\n".join(lines) + "\n")
    out = _mypy(mypy_dir, ["members.py"], mypypath=[Path(corner_mod.__file__).parent.parent])
    # every member is visible to mypy (the mangled ones too); the runtime modules mypy
    # follows from kvm_bindings are not on trial here
    assert not re.search(r"^members\.py:\d+: error", out, re.M), out[:3000]
    seen = 0
    for m in re.finditer(r'^members\.py:(\d+): note: Revealed type is "(.*)"$', out, re.M):
        value, what = where[int(m.group(1))]
        assert _reveals(value, _parse_revealed(m.group(2))), \
            f"{what}: mypy says {m.group(2)}, ctypes gives {value!r}"
        seen += 1
    assert seen == len(where) > 1000


# ---- __slots__: a misspelt field is an AttributeError; pickling and copying still work ----

def _a_real_value(value: object) -> object:
    """Something other than zero to store in a member that reads as `value` on a zeroed
    instance, of the type ctypes accepts for it."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int) or value is None:    # None: a NULL pointer, set by address
        return 1
    if isinstance(value, bytes):                   # a char array
        return b"\x01"
    if isinstance(value, float):
        return 1.0
    assert isinstance(value, (ctypes.Structure, ctypes.Union, ctypes.Array)), repr(value)
    return type(value).from_buffer_copy(b"\xff" * ctypes.sizeof(value))


def check_slots(mod: types.ModuleType, source: str) -> None:
    static = _source_annotations(source)
    for cls in _records(mod):
        obj = cls()
        assert not hasattr(obj, "__dict__"), cls.__name__
        members = sorted(set(static[cls.__name__]) | _bitfields(cls))
        misspelt = f"{members[0]}_" if members else "misspelt"
        assert not hasattr(cls, misspelt)
        with pytest.raises(AttributeError):
            setattr(obj, misspelt, 1)
        assert bytes(obj) == bytes(ctypes.sizeof(cls))    # and nothing was written
        for member in members:
            descriptor = getattr(cls, member)
            if isinstance(descriptor, _CFIELD) and descriptor.size == 0:
                continue    # a flexible array member: no bytes of its own
            # a real member still takes a value, and it lands in the struct's own bytes
            obj = cls()
            setattr(obj, member, _a_real_value(getattr(obj, member)))
            assert bytes(obj) != bytes(ctypes.sizeof(cls)), f"{cls.__name__}.{member}"


@pytest.mark.parametrize("arch", ARCHES)
def test_a_misspelt_field_is_an_attribute_error_on_every_shipped_struct(arch):
    check_slots(*_shipped(arch))


def test_a_misspelt_field_is_an_attribute_error_on_the_corner_cases(corners):
    mod, source = corners
    check_slots(mod, source)
    obj = mod.t_bits()
    with pytest.raises(AttributeError):
        obj.rpi = 1


def test_a_flexible_struct_keeps_its_capacity_and_refuses_other_names():
    from kvm_bindings.abi import x86_64
    msrs = x86_64.kvm_msrs.alloc(3)
    assert msrs.flex_capacity == 3 and len(msrs.flex_array()) == 3
    assert x86_64.kvm_msrs().flex_capacity == 0    # not made by alloc(): room for none
    with pytest.raises(AttributeError):
        msrs.nmsr = 2
    assert msrs.nmsrs == 3


def _ctypes_refuses_to_pickle(obj: ctypes.Structure | ctypes.Union) -> bool:
    """What ctypes' own __reduce__ says: it refuses a type holding a pointer (a ValueError)
    before it reaches for the __dict__ these classes no longer have (an AttributeError)."""
    try:
        ctypes.Structure.__reduce__(obj)   # the same _CData method for unions
    except ValueError:
        return True
    except AttributeError:
        return False
    raise AssertionError(f"{type(obj).__name__} has a __dict__")


@pytest.mark.parametrize("arch", ARCHES)
def test_every_shipped_struct_pickles_and_copies_by_value(arch):
    mod, _ = _shipped(arch)
    refused = 0
    for cls in _records(mod):
        size = ctypes.sizeof(cls)
        pattern = bytes((i * 7 + 1) & 0xFF for i in range(size))
        obj = cls.from_buffer_copy(pattern)
        if _ctypes_refuses_to_pickle(obj):    # an address means nothing in another process
            refused += 1
            for clone in (copy.copy, copy.deepcopy, pickle.dumps):
                with pytest.raises(ValueError, match="pointers"):
                    clone(obj)
            continue
        for clone in (copy.copy, copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
            other = clone(obj)
            assert type(other) is cls and bytes(other) == pattern, cls.__name__
            if size:   # its own bytes, not a view of the original's
                ctypes.memset(ctypes.addressof(other), 0, size)
                assert bytes(obj) == pattern, cls.__name__
    assert refused < len(_records(mod))


def test_a_struct_holding_a_pointer_is_refused_a_pickle_as_ctypes_refuses_it(corners):
    mod, _ = corners
    holders = [cls for cls in _records(mod) if _ctypes_refuses_to_pickle(cls())]
    assert holders     # the corners do have pointers
    for cls in holders:
        with pytest.raises(ValueError, match="pointers"):
            pickle.dumps(cls())


def test_a_flexible_struct_pickles_and_copies_with_its_entries():
    from kvm_bindings.abi import x86_64
    msrs = x86_64.kvm_msrs.alloc(3)
    for i, entry in enumerate(msrs.flex_array()):
        entry.index, entry.data = 0x10 + i, 0x1000 + i
    for clone in (copy.copy, copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        other = clone(msrs)
        assert type(other) is x86_64.kvm_msrs
        assert other.nmsrs == 3 and other.flex_capacity == 3
        assert [(e.index, e.data) for e in other.flex_array()] == \
            [(0x10, 0x1000), (0x11, 0x1001), (0x12, 0x1002)]
        other.flex_array()[2].data = 0
        assert msrs.flex_array()[2].data == 0x1002


# ---- pyright: the arch it picks, as the package's docstring tells a user to configure it ----

_PYRIGHT_SAMPLE = """\
from kvm_bindings import abi
from kvm_bindings.abi import arm64, riscv64, x86_64
reveal_type(abi.kvm_regs)
x86_64_regs: type[x86_64.kvm_regs] = abi.kvm_regs
arm64_regs: type[arm64.kvm_regs] = abi.kvm_regs
riscv64_regs: type[riscv64.kvm_regs] = abi.kvm_regs
reveal_type(abi.KVM_GET_MSRS)
reveal_type(abi.KVM_ARM_VCPU_INIT)
reveal_type(abi.KVM_REG_RISCV_CORE)
"""
# the line of each arch's `<arch>_regs: ... = abi.kvm_regs`, and of a name only it has
_REGS_LINE = {"x86_64": 4, "arm64": 5, "riscv64": 6}
_ONLY_LINE = {"x86_64": 7, "arm64": 8, "riscv64": 9}


def _pyright(tmp: Path, constants: dict[str, bool] | None,
             root: Path = ROOT) -> tuple[dict[int, list[str]], dict[int, str]]:
    """Run pyright on _PYRIGHT_SAMPLE: {line: [errors]}, {line: revealed type}."""
    pyright = shutil.which("pyright") or pytest.skip("pyright is not installed")
    (tmp / "sample.py").write_text(_PYRIGHT_SAMPLE)
    config: dict[str, object] = {"extraPaths": [str(root)], "include": ["sample.py"]}
    if constants is not None:
        config["defineConstant"] = constants
    (tmp / "pyrightconfig.json").write_text(json.dumps(config))
    proc = subprocess.run([pyright, "--outputjson"], cwd=tmp, capture_output=True, text=True,
                          timeout=600)
    report = json.loads(proc.stdout)
    errors: dict[int, list[str]] = {}
    reveals: dict[int, str] = {}
    for diag in report["generalDiagnostics"]:
        line = diag["range"]["start"]["line"] + 1
        if diag["severity"] == "information" and diag["message"].startswith("Type of"):
            reveals[line] = diag["message"]
        elif diag["severity"] == "error":
            errors.setdefault(line, []).append(diag["message"])
    assert reveals, proc.stdout    # pyright did read the sample
    return errors, reveals


def check_pyright_picks(errors: dict[int, list[str]], reveals: dict[int, str], arch: str,
                        exclusive: bool = True) -> None:
    assert reveals[3] == 'Type of "abi.kvm_regs" is "type[kvm_regs]"', reveals
    # abi.kvm_regs is assignable to this arch's kvm_regs alone, and is named as it
    assert _REGS_LINE[arch] not in errors, errors
    for other, line in _REGS_LINE.items():
        if other != arch:
            assert any(f'"type[kvm_bindings.abi.{arch}.kvm_regs]" is not assignable' in m
                       for m in errors.get(line, [])), errors
    assert _ONLY_LINE[arch] not in errors and "Literal[" in reveals[_ONLY_LINE[arch]], reveals
    if exclusive:   # a name only another arch has is flagged: one module, not three
        for other, line in _ONLY_LINE.items():
            if other != arch:
                assert any("is not a known attribute of module" in m
                           for m in errors.get(line, [])), errors


@pytest.mark.parametrize("constants, arch", [
    ({"KVM_BINDINGS_TYPING_ARM64": False, "KVM_BINDINGS_TYPING_RISCV64": False}, "x86_64"),
    ({"KVM_BINDINGS_TYPING_ARM64": True}, "arm64"),
    ({"KVM_BINDINGS_TYPING_ARM64": True, "KVM_BINDINGS_TYPING_RISCV64": False}, "arm64"),
    ({"KVM_BINDINGS_TYPING_ARM64": False, "KVM_BINDINGS_TYPING_RISCV64": True}, "riscv64"),
])
def test_pyright_sees_the_arch_its_define_constant_picks(tmp_path, constants, arch):
    check_pyright_picks(*_pyright(tmp_path, constants), arch)


def test_pyright_told_nothing_reads_x86_64s_types(tmp_path):
    # pyright reads both branches of a constant it is not given, so a name only arm64 or
    # riscv64 has gets through; a name every arch has is x86_64's, the default's (the
    # docstring tells pyright users to give every constant)
    check_pyright_picks(*_pyright(tmp_path, None), "x86_64", exclusive=False)


def test_a_pickle_whose_bytes_outgrow_the_room_it_asks_for_is_refused():
    # Copying them would run past the buffer alloc() made (found by an adversarial pass:
    # a tampered pickle crashed the interpreter).
    from kvm_bindings.abi import _support
    with pytest.raises(ValueError, match="do not fit"):
        _support._rebuild(x86_64.kvm_msrs, b"A" * (1 << 20), 0)
    good = x86_64.kvm_msrs.alloc(3)
    assert bytes(_support._rebuild(x86_64.kvm_msrs, bytes(good) + bytes(48), 3)) == bytes(good)


class _MyRegs(x86_64.kvm_regs):
    """A user's subclass: it has a __dict__ again, which a pickle must keep."""


def test_a_users_subclass_pickles_with_its_own_attributes():
    regs = _MyRegs()
    regs.rip, regs.note = 0x1234, "mine"
    for clone in (pickle.loads(pickle.dumps(regs)), copy.deepcopy(regs), copy.copy(regs)):
        assert type(clone) is _MyRegs and clone.rip == 0x1234 and clone.note == "mine"
