"""Random C integer expressions: our evaluator against gcc's answer.

Hypothesis builds expressions from literals of every suffix, casts to each
fixed-width type, unary and binary operators and shifts; each batch becomes a
header of macros that the generator evaluates and the probe prints.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codegen import conformance, headers
from codegen.arches import get_arch

CASTS = ["__u8", "__s8", "__u16", "__s16", "__u32", "__s32", "__u64", "__s64", "int",
         "unsigned int", "long", "unsigned long", "long long", "unsigned long long"]
SUFFIXES = ["", "U", "L", "UL", "LL", "ULL"]

literal = st.builds(lambda v, s, h: (hex(v) if h else str(v)) + s,
                    st.integers(0, 2**64 - 1) | st.integers(0, 300), st.sampled_from(SUFFIXES),
                    st.booleans())


def _expr(children):
    return st.one_of(
        st.builds(lambda o, a: f"({o}{a})", st.sampled_from(["-", "~", "!", "+"]), children),
        st.builds(lambda c, a: f"(({c}){a})", st.sampled_from(CASTS), children),
        st.builds(lambda a, o, b: f"({a} {o} {b})",
                  children, st.sampled_from(["+", "-", "*", "&", "|", "^", "==", "<", ">=",
                                             "&&", "||"]), children),
        st.builds(lambda a, b: f"({a} << {b})", children, st.integers(0, 31)),
        st.builds(lambda a, b: f"({a} >> {b})", children, st.integers(0, 31)),
        st.builds(lambda a, b: f"({a} / {b})", children, st.integers(1, 1000)),
        st.builds(lambda a, b: f"({a} % {b})", children, st.integers(1, 1000)),
        st.builds(lambda c, a, b: f"({c} ? {a} : {b})", children, children, children),
    )


expression = st.recursive(literal, _expr, max_leaves=6)


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(expression, min_size=20, max_size=40))
def test_random_expressions_evaluate_as_gcc_does(tmp_path_factory, header_set, exprs):
    real = header_set(headers.shipped_version())
    inc = tmp_path_factory.mktemp("expr")
    (inc / "linux").mkdir()
    lines = ["#include <linux/types.h>"]
    lines += [f"#define E_{i} {e}" for i, e in enumerate(exprs)]
    (inc / "linux" / "kvm.h").write_text("\n".join(lines) + "\n")
    hs = headers.HeaderSet("expr", (inc, *real.include_dirs), "random expressions")
    report = conformance.run(hs, get_arch("x86_64"))
    # a macro gcc itself rejects (a shift overflow makes no constant) may be listed instead
    assert report.mismatches == [], exprs


@pytest.mark.parametrize("text, value", [
    ("(-1) >> 1", -1), ("1U - 2", 2**32 - 1), ("(__u8)300", 44), ("-9 / 2", -4), ("-9 % 2", -1),
    ("0x80000000", 2**31), ("2147483648", 2**31), ("(long)-1 < 0U", 1), ("-1 < 0U", 0),
])
def test_known_c_corners(text, value, tmp_path, header_set):
    real = header_set(headers.shipped_version())
    (tmp_path / "linux").mkdir()
    (tmp_path / "linux" / "kvm.h").write_text(f"#include <linux/types.h>\n#define X ({text})\n")
    hs = headers.HeaderSet("corner", (tmp_path, *real.include_dirs), "corner")
    from codegen.pipeline import build_model
    model, _ = build_model(hs, get_arch("x86_64"))
    assert model.constants["X"].value == value
    assert conformance.run(hs, get_arch("x86_64")).mismatches == []
