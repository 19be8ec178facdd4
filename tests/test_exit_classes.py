"""Every exit reason has its own class, written out in exits.py where editors and mypy see it,
exposing exactly its kvm_run member's fields, typed, under names that shadow nothing of Exit's.

Each check is a function returning what is wrong; a test runs it on the real classes and
another feeds it a broken input (a newer kernel's reason, a grown struct, a shadowing field)
to show it can fail.
"""

from __future__ import annotations

import ctypes
import enum
import importlib
import inspect
import re
import subprocess
import sys
import textwrap
import types
import typing
from pathlib import Path

import pytest

from kvm_bindings import abi, exits
from kvm_bindings._layout import member

ROOT = Path(__file__).resolve().parent.parent

# The naming rule: X86_RDMSR -> X86RdmsrExit; two reasons read better under another name.
RENAMED = {"UNKNOWN": "UnknownHardwareExit",     # KVM_EXIT_UNKNOWN: hardware KVM did not know
           "INTR": "InterruptedExit"}
# Decoded by unpackers into their own attributes rather than carried as a payload.
DECODED_APART = {"IO": exits.IoExit, "MMIO": exits.MmioExit}
# ... and where each field of their member went.
IO_FIELDS = {"direction": "is_write", "size": "size", "port": "port", "count": "count",
             "data_offset": "data"}
MMIO_FIELDS = {"phys_addr": "phys_addr", "data": "data", "len": "data", "is_write": "is_write"}


def class_name(reason_name: str) -> str:
    return RENAMED.get(reason_name) or "".join(p.capitalize() for p in reason_name.split("_")) + "Exit"


def member_type(reason_name: str):
    name = abi.EXIT_MEMBERS.get(f"KVM_EXIT_{reason_name}")
    return None if name is None else member(abi.kvm_run, name)[1]


def c_fields(t) -> list[str]:
    """The fields of a generated struct as ctypes exposes them: anonymous members flattened."""
    if not hasattr(t, "_fields_"):
        return ["value"]                 # a scalar member (s390_reset_flags): ctypes' .value
    anonymous = getattr(t, "_anonymous_", ())
    return [n for name, ftype, *_ in t._fields_
            for n in (c_fields(ftype) if name in anonymous else [name])]


def payload_type(cls):
    """The T of PayloadExit[T] in cls's bases: what .payload is typed as."""
    for klass in cls.__mro__:
        for base in vars(klass).get("__orig_bases__", ()):
            if typing.get_origin(base) is exits.PayloadExit:
                return typing.get_args(base)[0]
    return None


def fields_of(cls) -> dict[str, exits._Field]:
    """{attribute: field descriptor} of an exit class."""
    return {n: v for n in dir(cls) if isinstance(v := inspect.getattr_static(cls, n), exits._Field)}


# ---- 1. one static class per reason --------------------------------------------------------

def missing_classes(reasons) -> list[str]:
    """What exits.py lacks for these reasons, each saying which class to write."""
    source = inspect.getsource(exits)
    problems = []
    for r in reasons:
        name, t = class_name(r.name), member_type(r.name)
        base = ("SimpleExit" if t is None
                else f"PayloadExit[abi.{t.__name__}]" if hasattr(t, "_fields_") else "PayloadExit")
        todo = (f"write `class {name}({base}, reason=ExitReason.{r.name})` in kvm_bindings/exits.py"
                + (f" with a _Field per field of kvm_run.{abi.EXIT_MEMBERS[f'KVM_EXIT_{r.name}']}"
                   if t is not None else "") + f", and add {name!r} to its __all__")
        cls = getattr(exits, name, None)
        if cls is None or not re.search(rf"^class {name}\(", source, re.M) or name not in exits.__all__:
            problems.append(f"ExitReason.{r.name} has no class of its own: {todo}")
        elif exits.EXIT_CLASSES.get(r) is not cls:
            problems.append(f"{name} is not EXIT_CLASSES[ExitReason.{r.name}]: declare it "
                            f"with reason=ExitReason.{r.name}")
    return problems


def test_every_exit_reason_has_a_static_class_named_for_it():
    assert missing_classes(abi.ExitReason) == []
    assert set(exits.EXIT_CLASSES) == set(abi.ExitReason)
    assert {c.__name__ for c in exits.EXIT_CLASSES.values()} <= set(exits.__all__)


def test_each_exit_class_says_on_its_first_line_which_c_reason_and_member_it_is():
    for r, cls in exits.EXIT_CLASSES.items():
        first = (cls.__doc__ or "").splitlines()[0]
        m = abi.EXIT_MEMBERS.get(f"KVM_EXIT_{r.name}")
        assert f"KVM_EXIT_{r.name}" in first, (cls.__name__, first)
        assert (f"kvm_run.{m}" if m else "no kvm_run member") in first, (cls.__name__, first)
    for name in exits.__all__:
        assert (getattr(exits, name).__doc__ or "").strip(), name


def test_a_reason_from_a_newer_kernel_fails_naming_the_class_to_write():
    newer = enum.IntEnum("ExitReason", {**{r.name: int(r) for r in abi.ExitReason},
                                        "FROB_WIDGET": 999})
    problems = [p for p in missing_classes(newer) if "FROB_WIDGET" in p]
    assert len(problems) == 1
    assert problems[0].startswith("ExitReason.FROB_WIDGET has no class of its own: write "
                                  "`class FrobWidgetExit(SimpleExit, reason=ExitReason.FROB_WIDGET)`")


def test_every_arch_has_the_same_exit_reasons_and_members():
    # exits.py is arch-neutral: one set of classes must fit every generated arch.
    mods = [importlib.import_module(f"kvm_bindings.abi.{a}") for a in abi.ARCHES]
    reasons = [{(r.name, int(r)) for r in m.ExitReason} for m in mods]
    assert all(r == reasons[0] for r in reasons), abi.ARCHES
    assert all(m.EXIT_MEMBERS == mods[0].EXIT_MEMBERS for m in mods)
    for m in mods:      # the member types the classes name exist under that name in every arch
        for name in abi.EXIT_MEMBERS.values():
            t = member(m.kvm_run, name)[1]
            assert not hasattr(t, "_fields_") or getattr(m, t.__name__) is t, (m.__name__, name)


def test_a_reason_with_a_kvm_run_member_carries_it_as_a_typed_payload():
    for r in abi.ExitReason:
        cls, t = exits.EXIT_CLASSES[r], member_type(r.name)
        if r.name in DECODED_APART:
            assert cls is DECODED_APART[r.name]
        elif t is None:
            assert issubclass(cls, exits.SimpleExit), cls
        else:
            assert issubclass(cls, exits.PayloadExit), cls
            assert payload_type(cls) is t, (cls, payload_type(cls), t)


def test_io_and_mmio_exits_account_for_every_field_of_their_member():
    for cls, t, where in ((exits.IoExit, abi.kvm_run_io, IO_FIELDS),
                          (exits.MmioExit, abi.kvm_run_mmio, MMIO_FIELDS)):
        assert set(c_fields(t)) == set(where), (t.__name__, "gained or lost a field")
        for attr in where.values():
            inspect.getattr_static(cls, attr)


# ---- 2. exactly the member's fields, typed ---------------------------------------------------

def field_mismatch(cls, t) -> list[str]:
    """How cls's fields differ from those of its member type t."""
    exposed = {f.c_name for f in fields_of(cls).values()}
    expected = set(c_fields(t))
    problems = [f"{cls.__name__} lacks kvm_run field {n!r} of {t.__name__}: add "
                f"`{n}: _Field[...] = _Field()`" for n in sorted(expected - exposed)]
    problems += [f"{cls.__name__} exposes {n!r}, which {t.__name__} does not have"
                 for n in sorted(exposed - expected)]
    return problems


PAYLOAD_CLASSES = sorted({c for c in exits.EXIT_CLASSES.values() if issubclass(c, exits.PayloadExit)},
                         key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", PAYLOAD_CLASSES, ids=lambda c: c.__name__)
def test_each_payload_exit_exposes_exactly_its_members_fields(cls):
    assert field_mismatch(cls, payload_type(cls)) == []


def test_a_field_added_by_the_headers_is_reported():
    grown = type("kvm_run_msr", (ctypes.Structure,),
                 {"_fields_": [*abi.kvm_run_msr._fields_, ("new_field", ctypes.c_uint32)]})
    assert field_mismatch(exits.X86RdmsrExit, grown) == [
        "X86RdmsrExit lacks kvm_run field 'new_field' of kvm_run_msr: add "
        "`new_field: _Field[...] = _Field()`"]


def _patterned(cls):
    """An exit of cls as decode() makes it, over a payload of distinct non-zero bytes."""
    t = payload_type(cls)
    e = cls.__new__(cls)
    e.reason = next(r for r, c in exits.EXIT_CLASSES.items() if c is cls)
    e._payload = t.from_buffer_copy(bytes((i * 7 + 3) & 0xFF for i in range(ctypes.sizeof(t))))
    return e


@pytest.mark.parametrize("cls", PAYLOAD_CLASSES, ids=lambda c: c.__name__)
def test_each_field_reads_the_copy_as_the_type_it_declares(cls):
    e = _patterned(cls)
    annotations = {n: a for k in reversed(cls.__mro__) for n, a in vars(k).get("__annotations__", {}).items()}
    for name, field in fields_of(cls).items():
        declared = typing.get_args(eval(annotations[name], vars(exits)))[0]
        value, raw = getattr(e, name), getattr(e.payload, field.c_name)
        if field.count:
            raw = raw[:getattr(e.payload, field.count)]
        if isinstance(declared, types.GenericAlias):          # list[int]
            assert isinstance(value, typing.get_origin(declared)), (name, value)
            assert all(isinstance(v, int) for v in value) and value == list(raw), name
        else:
            assert isinstance(value, declared), (cls.__name__, name, type(value), declared)
            if isinstance(value, (ctypes.Structure, ctypes.Union)):
                assert bytes(value) == bytes(raw), name
            elif isinstance(value, bytes):
                assert value == bytes(raw), name
            else:
                assert value == raw, name
        assert name in repr(e) or name.startswith(("pad", "reserved")), (name, repr(e))


# ---- 3. no field shadows Exit's own attributes ---------------------------------------------

def shadowed(cls) -> set[str]:
    """Field attributes of cls that some class in its MRO also defines as something else."""
    fields = set(fields_of(cls))
    own = {n for k in cls.__mro__ for n, v in vars(k).items() if not isinstance(v, exits._Field)}
    return fields & own


@pytest.mark.parametrize("cls", PAYLOAD_CLASSES, ids=lambda c: c.__name__)
def test_no_field_shadows_an_exit_attribute(cls):
    assert shadowed(cls) == set()
    own = {n for k in cls.__mro__ for n, v in vars(k).items() if not isinstance(v, exits._Field)}
    for name, field in fields_of(cls).items():
        # renamed only where the C name is taken, as the MSR exit's reason is
        assert name == field.c_name or field.c_name in own, (cls.__name__, name, field.c_name)


def test_the_msr_exits_own_reason_field_is_msr_reason():
    assert exits.MsrExit.msr_reason.c_name == "reason"
    exit_reason = inspect.getattr_static(exits.Exit, "reason")     # the slot holding the ExitReason
    assert inspect.getattr_static(exits.X86RdmsrExit, "reason") is exit_reason


def test_a_field_named_like_an_exit_attribute_is_reported():
    class Clashing(exits.MsrExit):
        __slots__ = ()
        reason: exits._Field[int] = exits._Field()   # the mistake: hides Exit.reason
    assert shadowed(Clashing) == {"reason"}


# ---- 4. what mypy sees -----------------------------------------------------------------------

def test_mypy_sees_the_classes_their_typed_fields_and_a_misspelt_field(tmp_path):
    pytest.importorskip("mypy")
    snippet = tmp_path / "uses_exits.py"
    snippet.write_text(textwrap.dedent("""\
        from kvm_bindings.exits import Exit, HltExit, HypercallExit, InternalErrorExit, X86RdmsrExit

        def handle(e: Exit) -> None:
            if isinstance(e, HypercallExit):
                reveal_type(e.nr)
                reveal_type(e.args)
                reveal_type(e.payload)
            if isinstance(e, X86RdmsrExit):
                reveal_type(e.msr_reason)
                e.idnex
            if isinstance(e, InternalErrorExit):
                reveal_type(e.suberror)
        reveal_type(HltExit)
        """))
    out = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
                          "--no-error-summary", "--hide-error-context", str(snippet)],
                         cwd=ROOT, capture_output=True, text=True).stdout
    mine = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(str(snippet))]
    assert mine == [
        'note: Revealed type is "int"',
        'note: Revealed type is "list[int]"',
        'note: Revealed type is "kvm_bindings.abi.x86_64.kvm_run_hypercall"',
        'note: Revealed type is "kvm_bindings.abi.x86_64_enums.MsrExitReason"',
        'error: "X86RdmsrExit" has no attribute "idnex"  [attr-defined]',
        'note: Revealed type is "kvm_bindings.abi.x86_64_enums.InternalError | int"',
        'note: Revealed type is "def () -> kvm_bindings.exits.HltExit"',
    ], out
