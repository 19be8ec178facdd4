"""Stage 4: the C layout of every type, computed for the target's ABI.

The rules are the System V / AAPCS64 / RISC-V psABI ones GCC follows for LP64
targets: members at the next multiple of their alignment, bitfields packed
into storage units of their declared type, flexible arrays adding no bytes,
and GCC's aligned/packed attributes. Results are in bytes except bitfield
positions, which are in bits from the start of the record.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GeneratorError
from .model import MAX_SIZE, Aligned, Array, Field, Function, Int, Model, Pointer, RecordRef, Type, Void


@dataclass(frozen=True)
class FieldLayout:
    field: Field
    offset: int            # bytes from the record start (bitfields: their storage unit)
    size: int              # bytes (bitfields: their storage unit)
    bit_offset: int | None = None   # bitfields: bits from the record start
    bit_size: int | None = None


@dataclass(frozen=True)
class RecordLayout:
    size: int
    align: int
    fields: tuple[FieldLayout, ...]


def round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class Layout:
    def __init__(self, model: Model) -> None:
        self.model = model
        self._records: dict[str, RecordLayout] = {}

    def size_align(self, t: Type) -> tuple[int, int]:
        if isinstance(t, Int):
            return t.size, t.size
        if isinstance(t, Pointer):
            n = self.model.arch.size("pointer")
            return n, n
        if isinstance(t, Array):
            size, align = self.size_align(t.element)
            return size * (t.length or 0), align
        if isinstance(t, RecordRef):
            r = self.record(t.key)
            return r.size, r.align
        if isinstance(t, Aligned):
            size, align = self.size_align(t.inner)
            return size, t.align if t.exact else max(align, t.align)
        if isinstance(t, (Void, Function)):
            return 1, 1   # GCC's sizeof(void) and sizeof of a function
        raise TypeError(t)

    def record(self, key: str) -> RecordLayout:
        if key not in self._records:
            self._records[key] = self._layout(key)
        return self._records[key]

    def _layout(self, key: str) -> RecordLayout:
        rec = self.model.records[key]
        if rec.fields is None:
            raise GeneratorError(f"{rec.kind} {rec.tag or key} is declared but never defined, "
                                 f"so it has no size", rec.file, rec.line)
        union = rec.kind == "union"
        bit = 0          # next free bit (structs)
        size = 0         # bytes (unions)
        align = 1
        out = []
        for f in rec.fields:
            fsize, falign = self.size_align(f.type)
            if fsize >= MAX_SIZE or bit // 8 + fsize >= MAX_SIZE:
                raise GeneratorError(f"{rec.kind} {rec.tag or key} would be {MAX_SIZE} bytes or "
                                     f"more; the generator does not lay out types that large",
                                     f.file or rec.file, f.line or rec.line)
            if rec.packed and not _has_member_align(f.type):
                falign = 1
            if f.bits is not None:
                unit_bits = fsize * 8
                if f.bits == 0:
                    bit = round_up(bit, falign * 8)
                    continue
                start = 0 if union else bit
                if not rec.packed and start // unit_bits != (start + f.bits - 1) // unit_bits:
                    start = round_up(start, unit_bits)
                if f.name is not None:  # unnamed bitfields do not align the record
                    align = max(align, falign)
                unit = start // (falign * 8) * falign
                out.append(FieldLayout(f, unit, fsize, start, f.bits))
                if union:
                    size = max(size, (f.bits + 7) // 8)
                else:
                    bit = start + f.bits
                continue
            align = max(align, falign)
            offset = 0 if union else round_up((bit + 7) // 8, falign)
            out.append(FieldLayout(f, offset, fsize))
            if union:
                size = max(size, fsize)
            else:
                bit = (offset + fsize) * 8
        if rec.align:
            align = max(align, rec.align)
        end = size if union else (bit + 7) // 8
        return RecordLayout(round_up(end, align), align, tuple(out))


def _has_member_align(t: Type) -> bool:
    return isinstance(t, Aligned) and not t.exact
