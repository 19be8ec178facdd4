"""abi.to_dict() and abi.from_dict(): every generated struct and union as plain data and back.

The oracle for "back" is the bytes: a struct filled with seeded random bytes must come back
from from_dict(type(o), to_dict(o)) with the same bits wherever a C member lies. Which bits
those are is worked out without to_dict: each leaf member of a zeroed instance is set to
all ones through ctypes' own descriptors (and the generator's bitfield descriptors), and
whatever bits turned on are the ones some member covers; the generator's padding is told
apart by the names codegen/names.py reserves for it. For the shipped modules that oracle is
checked in turn against what gcc said about every member (the *_facts.json files).
"""

from __future__ import annotations

import copy
import ctypes
import functools
import importlib
import json
import pickle
import random
import types
from importlib import resources

import pytest

from codegen import names
from kvm_bindings import abi
from kvm_bindings.abi import _plain, _support, from_dict, to_dict
from kvm_bindings.abi import x86_64 as x86

from .test_abi_types import _generated, _pinned, _records, corners  # noqa: F401 (a fixture)

ARCHES = ("x86_64", "arm64", "riscv64")
ENTRIES = 3    # room allocated for a flexible struct's trailing entries


# ---- the oracle: which bits some C member covers ----

def _is_padding(cls: type, name: str) -> bool:
    """A member the generator added: padding or the bytes its own bitfields live in."""
    if name in getattr(cls, "_anonymous_", ()):
        return False
    return name in ("_pad_end", "_pad_size") or bool(names._GENERATED_MEMBER.fullmatch(name))


def _fill(ctype: type, address: int) -> None:
    """Set every C member at `address` to all ones, through ctypes (ctypes and the
    generator's descriptors keep a bitfield's low bits, so -1 is all of its ones)."""
    if issubclass(ctype, (ctypes.Structure, ctypes.Union)):
        view = ctype.from_address(address)
        for f in ctype._fields_:
            if _is_padding(ctype, f[0]):
                continue
            if len(f) == 3:
                setattr(view, f[0], -1)
            else:
                _fill(f[1], address + getattr(ctype, f[0]).offset)
        for name, v in vars(ctype).items():
            if type(v).__name__ == "_Bitfield":    # a generation's own support module's
                setattr(view, name, -1)
    elif issubclass(ctype, ctypes.Array) and issubclass(ctype._type_, (ctypes.Structure,
                                                                      ctypes.Union, ctypes.Array)):
        size = ctypes.sizeof(ctype._type_)
        for i in range(ctype._length_):
            _fill(ctype._type_, address + i * size)
    else:
        ctypes.memset(address, 0xFF, ctypes.sizeof(ctype))


@functools.cache
def _coverage(cls: type, entries: int | None) -> bytes:
    """A mask of the bits C members cover in a cls (with `entries` trailing entries)."""
    size = ctypes.sizeof(cls)
    if entries is not None:
        offset = getattr(cls, cls._flex_field_).offset
        esize = ctypes.sizeof(cls._flex_type_)
        size = max(size, offset + entries * esize)
    buf = (ctypes.c_uint8 * size)()
    _fill(cls, ctypes.addressof(buf))
    for i in range(entries or 0):
        _fill(cls._flex_type_, ctypes.addressof(buf) + offset + i * esize)
    return bytes(buf)


def _raw(obj: ctypes.Structure | ctypes.Union) -> bytes:
    """All of obj's bytes, a flexible struct's entries too."""
    if hasattr(obj, "_flex_field_"):
        return ctypes.string_at(ctypes.addressof(obj), obj.flex_nbytes)
    return bytes(obj)


def _random(cls: type, rng: random.Random) -> tuple[ctypes.Structure | ctypes.Union, int | None]:
    """A cls of seeded random bytes; a flexible one with room for ENTRIES entries, its count
    member (if it has one) saying how many of them are used."""
    if not hasattr(cls, "_flex_field_"):
        return cls.from_buffer_copy(rng.randbytes(ctypes.sizeof(cls))), None
    obj = cls.alloc(ENTRIES)
    ctypes.memmove(ctypes.addressof(obj), rng.randbytes(obj.flex_nbytes), obj.flex_nbytes)
    used = ENTRIES
    if cls._flex_count_ is not None:
        used = rng.randint(0, ENTRIES)
        setattr(obj, cls._flex_count_, used)
    return obj, used


def check_round_trip(cls: type, rng: random.Random, mod: types.ModuleType = x86) -> None:
    """mod: the module cls is from; each generation has its own to_dict() and from_dict()."""
    obj, entries = _random(cls, rng)
    before = _raw(obj)
    back = mod.from_dict(cls, mod.to_dict(obj))
    assert type(back) is cls
    after = _raw(back)
    mask = _coverage(cls, entries)
    assert len(after) == len(mask), f"{cls.__name__}: {len(after)} bytes back, not {len(mask)}"
    for i, (b, a, m) in enumerate(zip(before, after, mask)):
        assert (b ^ a) & m == 0, (f"{cls.__name__}: byte {i} was {b:#04x}, came back {a:#04x} "
                                  f"(members cover {m:#04x} of it)")
        assert a & ~m == 0, f"{cls.__name__}: byte {i} is padding but came back {a:#04x}"
    if entries is not None:
        assert back.flex_capacity == entries


def check_module(mod: types.ModuleType) -> int:
    rng = random.Random(f"{mod.KERNEL_VERSION} {mod.ARCH}")
    records = _records(mod)
    for cls in records:
        check_round_trip(cls, rng, mod)
    return len(records)


# ---- every struct and union, of every module ----

@pytest.mark.parametrize("arch", ARCHES)
def test_every_shipped_struct_comes_back_from_its_dict_bit_for_bit(arch):
    assert check_module(importlib.import_module(f"kvm_bindings.abi.{arch}")) > 100


@pytest.mark.parametrize("version, arch", _pinned())
def test_every_struct_of_every_pinned_generation_comes_back_from_its_dict(header_set, version,
                                                                          arch):
    mod, _ = _generated(header_set(version, arch), arch)
    assert check_module(mod) > 50


def test_the_layout_corners_come_back_from_their_dicts(corners):  # noqa: F811
    mod, _ = corners
    check_module(mod)
    # what makes them corners: the generator's own bitfields, __int128, pointers, a union
    bits = mod.to_dict(mod.t_bits.from_buffer_copy(bytes(range(1, 17))))
    assert set(bits) == {"a", "b", "c", "d", "e", "f"}     # not the bytes they live in
    assert mod.to_dict(mod.t_i128())["x"] == [0, 0]


def test_the_oracle_agrees_with_gcc_on_what_the_members_cover():
    """A covered byte is inside some member gcc placed; each member gcc placed covers a
    byte. So the padding the round trip may drop is padding."""
    checked = 0
    for arch in ARCHES:
        mod = importlib.import_module(f"kvm_bindings.abi.{arch}")
        facts = json.loads(resources.files("kvm_bindings.abi").joinpath(f"{arch}_facts.json")
                           .read_text())
        for cname, members in facts["fields"].items():
            cls = mod.C_TYPES.get(cname)
            if cls is None:
                continue
            mask = _coverage(cls, 0 if hasattr(cls, "_flex_field_") else None)
            spans = [(off, off + size) for off, size in members.values() if size]
            for bit, width in facts.get("bitfields", {}).get(cname, {}).values():
                spans.append((bit // 8, (bit + width + 7) // 8))
            for lo, hi in spans:
                assert any(mask[lo:hi]), f"{arch} {cname}: nothing covers bytes {lo}..{hi}"
            for i, m in enumerate(mask):
                assert not m or any(lo <= i < hi for lo, hi in spans), \
                    f"{arch} {cname}: byte {i} is covered but no member of gcc's is there"
            checked += 1
    assert checked > 200


# ---- the round trip can fail: three broken to_dict()s it catches ----

def _char_arrays_as_ctypes_reads_them(original):
    def dump_array(element, length, address):
        out = original(element, length, address)
        return out.split(b"\0")[0] if element is ctypes.c_char else out
    return dump_array


def _only_a_unions_first_member(original):
    def members(cls):
        out = original(cls)
        return out[:1] if issubclass(cls, ctypes.Union) else out
    return members


BROKEN = {
    "char arrays cut at the first NUL": ("_dump_array", _char_arrays_as_ctypes_reads_them,
                                         {"kvm_lapic_state", "kvm_run"}),
    "a union's first member only": ("_members", _only_a_unions_first_member,
                                    {"kvm_run", "kvm_run_u", "kvm_irq_routing_entry"}),
    "flexible entries left out": ("_is_flex", lambda original: lambda *a: False,
                                  {"kvm_cpuid2", "kvm_msrs", "kvm_coalesced_mmio_ring",
                                   "kvm_stats_desc"}),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_the_round_trip_check_catches_a_broken_to_dict(monkeypatch, broken):
    name, make, must_catch = BROKEN[broken]
    monkeypatch.setattr(_plain, name, make(getattr(_plain, name)))
    rng = random.Random(broken)
    caught = set()
    for cls in _records(x86):
        try:
            check_round_trip(cls, rng)
        except (AssertionError, ValueError):    # bytes lost, or a count that no longer fits
            caught.add(cls.__name__)
    assert must_catch <= caught, must_catch - caught


def test_a_nul_inside_a_char_array_and_every_union_member_survive():
    lapic = x86.kvm_lapic_state()
    ctypes.memmove(ctypes.addressof(lapic), b"\x01\x00\x02", 3)   # ctypes reads b"\x01"
    lapic_dict = to_dict(lapic)
    assert lapic_dict["regs"] == b"\x01\x00\x02" + bytes(1021)
    assert bytes(from_dict(x86.kvm_lapic_state, lapic_dict)) == bytes(lapic)

    run = x86.kvm_run()
    run.io.port = 0x3F8                  # inside hw.hardware_exit_reason as well
    ctypes.memmove(ctypes.addressof(run) + x86.kvm_run.padding.offset + 100, b"Z", 1)
    run_dict = to_dict(run)
    union = [m for m, *_ in x86.kvm_run_u._fields_]     # the anonymous union, lifted
    assert union == [k for k in run_dict if k in union]   # every member's view, in order
    assert run_dict["io"]["port"] == 0x3F8 and run_dict["hw"]["hardware_exit_reason"] == 0x3F80000
    assert run_dict["padding"][100:101] == b"Z"
    assert bytes(from_dict(x86.kvm_run, run_dict)) == bytes(run)


def test_a_flexible_structs_entries_are_a_list_as_long_as_its_count_says():
    cpuid = x86.kvm_cpuid2.alloc(3)
    cpuid.nent = 2
    cpuid.flex_array(3)[1].function = 0x8000_0001
    d = to_dict(cpuid)
    assert [e["function"] for e in d["entries"]] == [0, 0x8000_0001]
    back = from_dict(x86.kvm_cpuid2, d)
    assert back.nent == back.flex_capacity == 2
    assert back.flex_array()[1].function == 0x8000_0001

    desc = x86.kvm_stats_desc.alloc(4)     # no count member: the capacity says
    ctypes.memmove(ctypes.addressof(desc) + x86.kvm_stats_desc.name.offset, b"ab\0d", 4)
    assert to_dict(desc)["name"] == b"ab\0d"


def test_a_flexible_struct_whose_count_outgrows_its_room_is_refused():
    cpuid = x86.kvm_cpuid2.alloc(1)
    cpuid.nent = 5
    with pytest.raises(ValueError, match="room for 1 entries"):
        to_dict(cpuid)


def test_a_count_member_left_out_says_how_many_entries_and_one_given_must_agree():
    made = from_dict(x86.kvm_msrs, {"entries": [{"index": 0x10}, {}]})
    assert made.nmsrs == made.flex_capacity == 2 and made.flex_array()[0].index == 0x10
    assert from_dict(x86.kvm_msrs, {}).flex_capacity == 0
    with pytest.raises(ValueError, match=r"kvm_msrs\.nmsrs is 3 but kvm_msrs\.entries "
                                         r"has 2 entries"):
        from_dict(x86.kvm_msrs, {"nmsrs": 3, "entries": [{}, {}]})
    with pytest.raises(TypeError, match=r"^kvm_msrs\.entries: the entries are a list"):
        from_dict(x86.kvm_msrs, {"entries": 2})


# ---- anonymous members: their keys are lifted, as ctypes lifts their attributes ----

def _generated_keys(d: object) -> list[str]:
    """Keys anywhere in a to_dict() result that are a generator's name for an anonymous
    member."""
    if isinstance(d, dict):
        return [k for k in d if k.startswith("_anon")] + \
            [k for v in d.values() for k in _generated_keys(v)]
    if isinstance(d, list):
        return [k for v in d for k in _generated_keys(v)]
    return []


def test_an_anonymous_members_keys_are_in_its_parents_dict_and_its_name_is_none():
    msrs = x86.kvm_msrs.alloc(2)
    msrs.flex_array()[1].index = 0xC000_0080
    d = to_dict(msrs)
    assert "_anon0" in x86.kvm_msrs._anonymous_
    assert list(d) == ["nmsrs", "pad", "__empty_entries", "entries"]
    assert d["entries"][1]["index"] == 0xC000_0080
    assert bytes(from_dict(x86.kvm_msrs, d)) == bytes(msrs)

    run = x86.kvm_run()
    run.exit_reason = x86.KVM_EXIT_IO
    run.io.port = 0x3F8
    run.emulation_failure.insn_size = 3      # an anonymous struct in an anonymous union
    d = to_dict(run)
    assert {"exit_reason", "io", "mmio", "hw", "padding", "s"} <= set(d)
    assert d["io"]["port"] == 0x3F8
    assert d["emulation_failure"]["insn_size"] == 3 and "insn_bytes" in d["emulation_failure"]
    assert _generated_keys(d) == []
    assert bytes(from_dict(x86.kvm_run, d)) == bytes(run)
    assert from_dict(x86.kvm_run, {"io": {"port": 0x3F8}}).io.port == 0x3F8
    assert from_dict(x86.kvm_run, {"emulation_failure": {"insn_size": 3}}) \
        .emulation_failure.insn_size == 3


@pytest.mark.parametrize("arch", ARCHES)
def test_no_shipped_structs_dict_has_a_generated_key(arch):
    mod = importlib.import_module(f"kvm_bindings.abi.{arch}")
    rng = random.Random(arch)
    for cls in _records(mod):
        obj, _ = _random(cls, rng)
        assert _generated_keys(to_dict(obj)) == [], cls.__name__


def test_the_generators_name_for_an_anonymous_member_is_no_key_of_from_dict():
    with pytest.raises(ValueError, match=r"^kvm_msrs has no member '_anon0'"):
        from_dict(x86.kvm_msrs, {"_anon0": {"entries": [{}]}})
    with pytest.raises(ValueError, match=r"^kvm_run has no member '_anon0'"):
        from_dict(x86.kvm_run, {"_anon0": {"io": {"port": 1}}})
    with pytest.raises(ValueError, match=r"^kvm_run\.emulation_failure \(a kvm_run_emulation_"
                                         r"failure\) has no member '_anon0'"):
        from_dict(x86.kvm_run, {"emulation_failure": {"_anon0": {}}})
    with pytest.raises(ValueError, match=r"^kvm_run has no member 'iox'; did you mean 'io'"):
        from_dict(x86.kvm_run, {"iox": {}})       # a lifted key is a member to suggest
    with pytest.raises(ValueError, match=r"^kvm_run\.io\.port: 65536 does not fit"):
        from_dict(x86.kvm_run, {"io": {"port": 1 << 16}})    # the path has no _anon0 either


class _Inner(_support._Structure):
    __slots__ = ()
    _fields_ = [("lo", ctypes.c_uint16), ("hi", ctypes.c_uint16)]


class _Either(_support._Union):
    __slots__ = ()
    _anonymous_ = ("_anon0",)
    _fields_ = [("word", ctypes.c_uint32), ("_anon0", _Inner), ("byte", ctypes.c_uint8)]


class _Outer(_support._Structure):
    __slots__ = ()
    _anonymous_ = ("_anon0",)
    _fields_ = [("tag", ctypes.c_uint8), ("_anon0", _Either)]


def test_nested_anonymous_members_lift_all_the_way_and_a_union_is_written_in_order():
    outer = _Outer.from_buffer_copy(bytes([7, 0, 0, 0, 0x11, 0x22, 0x33, 0x44]))
    assert outer.lo == 0x2211       # what ctypes lifts
    d = to_dict(outer)
    assert d == {"tag": 7, "word": 0x44332211, "lo": 0x2211, "hi": 0x4433, "byte": 0x11}
    assert bytes(from_dict(_Outer, d)) == bytes(outer)
    # declaration order: word, then lo and hi over it, then byte over lo's low byte
    made = from_dict(_Outer, {"word": 0xFFFFFFFF, "hi": 0, "byte": 5})
    assert (made.word, made.lo, made.hi) == (0x0000FF05, 0xFF05, 0)
    with pytest.raises(ValueError, match=r"^_Outer has no member '_anon0'"):
        from_dict(_Outer, {"_anon0": {"word": 1}})


# ---- from_dict: what it refuses, and what it fills in ----

def test_a_key_the_struct_does_not_have_is_a_value_error_naming_struct_and_key():
    with pytest.raises(ValueError, match="^kvm_regs has no member 'raxx'; did you mean 'rax'"):
        from_dict(x86.kvm_regs, {"rax": 1, "raxx": 2})
    with pytest.raises(ValueError, match=r"^kvm_sregs\.cs \(a kvm_segment\) has no member 'x'$"):
        from_dict(x86.kvm_sregs, {"cs": {"x": 1}})
    with pytest.raises(ValueError, match="has no member '_pad_end'"):   # padding is no member
        from_dict(x86.kvm_sregs, {"_pad_end": b""})


@pytest.mark.parametrize("data, path, shown", [
    ({"cs": {"base": 1 << 64}}, "kvm_sregs.cs.base", r"18446744073709551616 does not fit an unsigned 64"),
    ({"cs": {"base": -1}}, "kvm_sregs.cs.base", r"-1 does not fit an unsigned 64-bit"),
    ({"cs": {"type": 256}}, "kvm_sregs.cs.type", r"256 does not fit an unsigned 8-bit .*\(0\.\.255\)"),
    ({"interrupt_bitmap": [0, 0, 0, -5]}, r"kvm_sregs.interrupt_bitmap\[3\]", "-5 does not fit"),
])
def test_a_value_out_of_its_c_types_range_is_refused_not_truncated(data, path, shown):
    with pytest.raises(ValueError, match=f"^{path}: {shown}"):
        from_dict(x86.kvm_sregs, data)


def test_a_signed_member_and_bitfields_are_held_to_their_own_range():
    pit = x86.kvm_pit_channel_state
    assert from_dict(pit, {"count_load_time": -(1 << 63)}).count_load_time == -(1 << 63)
    with pytest.raises(ValueError, match=r"^kvm_pit_channel_state\.count_load_time: "
                                         r"9223372036854775808 does not fit a signed 64"):
        from_dict(pit, {"count_load_time": 1 << 63})
    fields = {"redirtbl": [{"fields": {"delivery_mode": 7}}] + [{}] * 23}
    assert from_dict(x86.kvm_ioapic_state, fields).redirtbl[0].fields.delivery_mode == 7
    fields["redirtbl"][0]["fields"]["delivery_mode"] = 8      # ctypes would store 0
    with pytest.raises(ValueError, match=r"redirtbl\[0\]\.fields\.delivery_mode: 8 does not "
                                         r"fit a 3-bit bitfield"):
        from_dict(x86.kvm_ioapic_state, fields)


def test_the_generators_own_bitfields_are_held_to_their_width(corners):  # noqa: F811
    mod, _ = corners
    assert mod.from_dict(mod.t_bits, {"d": (1 << 40) - 1}).d == (1 << 40) - 1
    with pytest.raises(ValueError, match=r"^t_bits\.a: 8 does not fit a 3-bit bitfield"):
        mod.from_dict(mod.t_bits, {"a": 8})
    # this package's functions would not see that generation's bitfields: they say so
    with pytest.raises(TypeError, match="from another generated package"):
        to_dict(mod.t_bits())
    with pytest.raises(TypeError, match="use that package's own to_dict"):
        from_dict(mod.t_bits, {})


@pytest.mark.parametrize("data, error, shown", [
    ({"cs": {"base": "1"}}, TypeError, r"kvm_sregs\.cs\.base: an int is expected, not str '1'"),
    ({"cs": {"base": 1.0}}, TypeError, r"kvm_sregs\.cs\.base: an int is expected, not float"),
    ({"cs": 5}, TypeError, r"kvm_sregs\.cs: a kvm_segment is given as a dict, not int"),
    ({"cs": {"base": {}}}, TypeError, r"kvm_sregs\.cs\.base: an int is expected, not dict"),
    ({"interrupt_bitmap": [0, 0]}, ValueError, r"kvm_sregs\.interrupt_bitmap: 2 entries given "
                                               r"for an array of 4"),
    ({"interrupt_bitmap": 0}, TypeError, r"kvm_sregs\.interrupt_bitmap: an array of 4 is given "
                                         r"as a list, not int"),
])
def test_a_value_of_the_wrong_kind_names_its_member(data, error, shown):
    with pytest.raises(error, match=f"^{shown}"):
        from_dict(x86.kvm_sregs, data)


def test_a_char_array_takes_bytes_no_longer_than_it_and_never_str():
    assert bytes(from_dict(x86.kvm_lapic_state, {"regs": b"ab"})) == b"ab" + bytes(1022)
    with pytest.raises(TypeError, match=r"^kvm_lapic_state\.regs: a char\[1024\] is given as "
                                        r"bytes, not str"):
        from_dict(x86.kvm_lapic_state, {"regs": "ab"})
    with pytest.raises(ValueError, match="1025 bytes do not fit a char"):
        from_dict(x86.kvm_lapic_state, {"regs": bytes(1025)})


def test_keys_left_out_are_zero():
    made = from_dict(x86.kvm_sregs, {"cs": {"base": 0x1000, "l": 1}, "efer": 0x500})
    want = x86.kvm_sregs()
    want.cs.base, want.cs.l, want.efer = 0x1000, 1, 0x500
    assert bytes(made) == bytes(want)
    assert bytes(from_dict(x86.kvm_sregs, {})) == bytes(x86.kvm_sregs())


def test_the_dict_is_plain_python_data_but_not_json():
    """Char arrays are bytes: to_dict() promises plain data, not JSON."""
    d = to_dict(x86.kvm_lapic_state())
    assert type(d["regs"]) is bytes and len(d["regs"]) == 1024
    with pytest.raises(TypeError):
        json.dumps(d)
    regs = to_dict(x86.kvm_regs())
    assert json.loads(json.dumps(regs)) == regs and all(type(v) is int for v in regs.values())


def test_pickling_and_copying_are_unchanged_by_a_trip_through_a_dict():
    sregs = from_dict(x86.kvm_sregs, {"cs": {"base": 7}, "cr0": 1})
    for again in (pickle.loads(pickle.dumps(sregs)), copy.copy(sregs)):
        assert type(again) is x86.kvm_sregs and bytes(again) == bytes(sregs)
        assert to_dict(again) == to_dict(sregs)
    cpuid = from_dict(x86.kvm_cpuid2, {"entries": [{"eax": 1}, {"eax": 2}]})
    again = pickle.loads(pickle.dumps(cpuid))
    assert again.flex_capacity == 2 and to_dict(again) == to_dict(cpuid)


# ---- what the generated ABI has no example of: the types a user's own struct may use ----

class _Odd(_support._Structure):
    __slots__ = ()
    _fields_ = [("flag", ctypes.c_bool), ("c", ctypes.c_char), ("s", ctypes.c_int8, 3),
                ("u", ctypes.c_int8, 5), ("p", ctypes.c_char_p), ("names", ctypes.c_char * 4 * 2)]


def test_a_bool_a_char_a_signed_bitfield_and_a_char_pointer_come_back():
    odd = _Odd.from_buffer_copy(bytes([0x57, 0x00, 0xFF]) + bytes(5)
                                + (0xDEAD_BEEF).to_bytes(8, "little") + b"a\0bcd\0\0e")
    d = to_dict(odd)     # the pointer is not followed: it points nowhere
    assert d == {"flag": 0x57, "c": b"\0", "s": -1, "u": -1, "p": 0xDEAD_BEEF,
                 "names": [b"a\0bc", b"d\0\0e"]}
    assert bytes(from_dict(_Odd, d)) == bytes(odd)
    assert to_dict(_Odd(flag=True))["flag"] is True
    assert from_dict(_Odd, {"p": None, "flag": False}).flag is False
    with pytest.raises(ValueError, match=r"^_Odd\.s: -5 does not fit a 3-bit bitfield"):
        from_dict(_Odd, {"s": -5})
    with pytest.raises(TypeError, match=r"^_Odd\.c: a char is given as bytes of length 1"):
        from_dict(_Odd, {"c": b"ab"})


def test_only_structs_and_unions_have_dicts():
    with pytest.raises(TypeError, match="not c_uint"):
        to_dict(ctypes.c_uint32(1))   # type: ignore[arg-type]
    with pytest.raises(TypeError, match="makes a ctypes struct or union"):
        from_dict(ctypes.c_uint32, {})   # type: ignore[type-var]


def test_no_c_name_can_take_the_functions_names_in_a_generated_module():
    for name in ("to_dict", "from_dict"):
        assert name in names.MODULE_RESERVED
        assert names.python_name(name, "module") == name + "_"
    for arch in ARCHES:    # whatever an arch module takes from _support or _plain is reserved
        mod = importlib.import_module(f"kvm_bindings.abi.{arch}")
        shared = {n for n, v in vars(mod).items() if isinstance(v, (type, types.FunctionType))
                  and v.__module__ in (_support.__name__, _plain.__name__)}
        assert {"to_dict", "from_dict"} <= shared <= names.MODULE_RESERVED


def test_the_abi_package_and_every_arch_module_give_the_one_pair_of_functions():
    assert abi.to_dict is to_dict is _plain.to_dict
    assert abi.from_dict is from_dict is _plain.from_dict
    for arch in ARCHES:
        mod = importlib.import_module(f"kvm_bindings.abi.{arch}")
        assert mod.to_dict is to_dict and mod.from_dict is from_dict
        assert {"to_dict", "from_dict"} <= set(mod.__all__)
