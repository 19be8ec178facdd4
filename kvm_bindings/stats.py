"""Binary statistics (KVM_GET_STATS_FD): a header, descriptors, then the values."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from . import abi
from ._fd import FdObject
from ._layout import member

__all__ = ["StatDescriptor", "Stats"]


@dataclass(frozen=True)
class StatDescriptor:
    """One statistic: its name, kind, unit and where its values are (struct kvm_stats_desc)."""

    name: str
    type: str        # "cumulative", "instant", "peak", "linear_hist" or "log_hist"
    unit: str        # "none", "bytes", "seconds", "cycles" or "boolean"
    base: int        # 10 or 2: the values scale by base ** exponent
    exponent: int
    size: int        # how many u64 values
    offset: int      # within the data block
    bucket_size: int


def _names(prefix: str) -> dict[int, str]:
    return {getattr(abi, n): n[len(prefix):].lower() for n in dir(abi)
            if n.startswith(prefix) and not n.endswith(("_MASK", "_SHIFT", "_MAX"))}


class Stats(FdObject):
    """A stats fd of a VM or vCPU: read() gives {name: value or list of values}."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        try:
            self._read_descriptors(fd)
        except BaseException:
            self.close()
            raise

    def _read_descriptors(self, fd: int) -> None:
        header = abi.kvm_stats_header.from_buffer_copy(
            os.pread(fd, ctypes.sizeof(abi.kvm_stats_header), 0))
        self.id = os.pread(fd, header.name_size, header.id_offset).split(b"\0")[0].decode()
        self._data_offset = header.data_offset
        desc_size = ctypes.sizeof(abi.kvm_stats_desc) + header.name_size
        raw = os.pread(fd, desc_size * header.num_desc, header.desc_offset)
        types, units = _names("KVM_STATS_TYPE_"), _names("KVM_STATS_UNIT_")
        bases = {abi.KVM_STATS_BASE_POW10: 10, abi.KVM_STATS_BASE_POW2: 2}
        name_at = member(abi.kvm_stats_desc, "name")[0]
        self.descriptors: list[StatDescriptor] = []
        for i in range(header.num_desc):
            chunk = raw[i * desc_size:(i + 1) * desc_size]
            d = abi.kvm_stats_desc.from_buffer_copy(chunk[:ctypes.sizeof(abi.kvm_stats_desc)])
            name = chunk[name_at:name_at + header.name_size].split(b"\0")[0].decode()
            self.descriptors.append(StatDescriptor(
                name, types.get(d.flags & abi.KVM_STATS_TYPE_MASK, "unknown"),
                units.get(d.flags & abi.KVM_STATS_UNIT_MASK, "unknown"),
                bases.get(d.flags & abi.KVM_STATS_BASE_MASK, 10), d.exponent, d.size, d.offset,
                d.bucket_size))
        self._data_size = max((d.offset + 8 * d.size for d in self.descriptors), default=0)

    def read(self) -> dict[str, int | list[int]]:
        """Current values: an int per scalar statistic, a list per histogram."""
        self._hold()       # the fd number stays this stats fd's while it is read
        try:
            data = os.pread(self._fd, self._data_size, self._data_offset)
        finally:
            self._unhold()
        out: dict[str, int | list[int]] = {}
        for d in self.descriptors:
            values = [int.from_bytes(data[d.offset + 8 * i:d.offset + 8 * i + 8], "little")
                      for i in range(d.size)]
            out[d.name] = values[0] if d.size == 1 else values
        return out
