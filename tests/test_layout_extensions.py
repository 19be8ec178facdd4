"""GCC layout extensions and C corner cases, generated and checked against gcc.

tests/headers/linux/kvm.h holds one struct per corner: __int128 and the
aligned(16) __u128, packed, aligned members and types, bitfields of mixed types
and zero width, every flexible-array spelling, anonymous members, and macros
whose values need C's integer rules.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from codegen import conformance, headers, pipeline
from codegen.arches import get_arch

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def synthetic(header_set):
    real = header_set(headers.shipped_version())   # for linux/types.h and linux/ioctl.h
    hs = headers.HeaderSet("synthetic", (HERE / "headers", *real.include_dirs), "tests/headers")
    return hs


@pytest.fixture(scope="module")
def generated(synthetic):
    arch = get_arch("x86_64")
    files = pipeline.generate(synthetic, arch)
    return conformance.load_generated(files, arch), files


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "riscv64"])
def test_every_corner_matches_the_arch_compiler(synthetic, arch, cross_compiler, reports):
    cross_compiler(arch)
    report = conformance.run(synthetic, get_arch(arch))
    report.version = "synthetic corners"
    reports.append(report)
    assert report.mismatches == []
    assert report.counts["bitfields"] == 6 and report.counts["ioctls"] == 4
    assert report.counts["types"] >= 19


def test_int128_members_keep_their_16_byte_alignment(generated):
    mod, _ = generated
    assert mod.t_u128.b.offset == 16 and ctypes.sizeof(mod.t_u128) == 48
    assert max(ctypes.alignment(mod.t_u128), mod.t_u128._align_) == 16


def test_mixed_type_bitfields_read_and_write_their_own_bits(generated):
    mod, _ = generated
    t = mod.t_bits()
    t.d = (1 << 40) - 1
    t.c = 2
    assert (t.a, t.b, t.c, t.d, t.e) == (0, 0, 2, (1 << 40) - 1, 0)
    t.d = 0
    assert t.c == 2


def test_values_follow_c_integer_rules(generated):
    mod, _ = generated
    assert mod.T_SHIFT == 1 << 63          # 1UL << 63, unsigned long
    assert mod.T_CAST == 0xFFFFFFFF        # (__u32)-1
    assert mod.T_MIX == 1 << 32            # ~0U + 1UL: converted to unsigned long first
    assert mod.T_OCT == 15 and mod.T_STR == "hello" and mod.T_ENUM_ALIAS == 5


def test_unevaluable_macro_is_listed_with_its_reason(generated):
    mod, files = generated
    reasons = {name: reason for name, kind, reason, where in mod.UNEXPRESSED}
    assert "PAGE_SIZE" in reasons["T_UNEVAL"]
    assert not hasattr(mod, "T_UNEVAL")


def test_ioctl_metadata_names_the_argument_type(generated):
    mod, _ = generated
    io = mod.IOCTLS["T_IOWR"]
    assert (io.direction, io.arg_type, io.arg_c) == ("readwrite", mod.t_flex, "struct t_flex")
    assert mod.IOCTLS["T_IO"].arg_type is None
    assert mod.IOCTLS["T_IOW_INT"].arg_type is ctypes.c_uint64
