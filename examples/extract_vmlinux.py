"""Extract the uncompressed ELF vmlinux from a bzImage, to boot it without the decompressor.

Run it:  python examples/extract_vmlinux.py BZIMAGE VMLINUX

A bzImage carries the kernel compressed; its setup header (abi.setup_header, generated
from asm/bootparam.h) says where: payload_offset bytes into the protected-mode code,
payload_length long. gzip, xz, lzma and bzip2 payloads are unpacked with the standard
library; lz4 needs the lz4 package (pip install lz4), zstd the zstandard package.
"""

from __future__ import annotations

import bz2
import ctypes
import lzma
import struct
import sys
import zlib

from kvm_bindings.abi import x86_64 as abi

HDR = abi.boot_params.hdr.offset          # where the setup header sits in the image: 0x1f1
SECTOR = 512


def payload(image: bytes) -> bytes:
    """The compressed kernel inside a bzImage (boot protocol 2.08 and later)."""
    hdr = abi.setup_header.from_buffer_copy(image[HDR:HDR + ctypes.sizeof(abi.setup_header)])
    if hdr.header != int.from_bytes(b"HdrS", "little") or hdr.version < 0x208:
        raise ValueError("not a bzImage with payload fields (boot protocol 2.08 or later)")
    start = ((hdr.setup_sects or 4) + 1) * SECTOR + hdr.payload_offset
    return image[start:start + hdr.payload_length]


def decompress(data: bytes) -> bytes:
    """Unpack by the payload's magic; trailing bytes (the kernel appends its size) are ignored."""
    if data[:2] == b"\x1f\x8b":
        return zlib.decompressobj(wbits=31).decompress(data)
    if data[:6] == b"\xfd7zXZ\x00" or data[:3] == b"\x5d\x00\x00":
        return lzma.LZMADecompressor().decompress(data)
    if data[:3] == b"BZh":
        return bz2.BZ2Decompressor().decompress(data)
    if data[:4] == b"\x02\x21\x4c\x18":
        return _lz4_legacy(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard  # type: ignore[import-not-found]
        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    raise ValueError(f"unknown compression (magic {data[:6].hex()})")


def _lz4_legacy(data: bytes) -> bytes:
    """lz4's legacy frame, as the kernel writes it: the magic, then blocks of at most 8 MiB,
    each after its compressed size; what follows the last block is the kernel's size."""
    import lz4.block  # type: ignore[import-not-found]
    out, pos = [], 4
    while pos + 4 <= len(data):
        size = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if pos + size > len(data):
            break
        out.append(lz4.block.decompress(data[pos:pos + size], uncompressed_size=8 << 20))
        pos += size
    return b"".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        vmlinux = decompress(payload(f.read()))
    if vmlinux[:4] != b"\x7fELF":
        print("the payload did not unpack to an ELF file", file=sys.stderr)
        return 1
    with open(argv[1], "wb") as f:
        f.write(vmlinux)
    print(f"{argv[1]}: {len(vmlinux)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
