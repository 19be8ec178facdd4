"""Constant expressions: C integer arithmetic on the preprocessor's expansions.

Values carry their C type so that unsigned wrap-around, shifts and the usual
arithmetic conversions give what the compiler gives (1UL << 63, ~0U, (__u64)-1).
sizeof asks the layout. An expression that names something this arch does not
have raises Unevaluable with the reason, for the generated skip list.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from pycparser import c_ast

from .model import Int, Model, strip_aligned
from .preprocess import IOC_MARKER


class Unevaluable(Exception):
    pass


@dataclass(frozen=True)
class Value:
    value: int | str
    type: Int | None        # None for strings


@dataclass(frozen=True)
class IocParts:
    """What _IOC(dir, type, nr, size) was given, for an ioctl's metadata."""

    dir: int
    type: int
    nr: int
    size: int
    arg: c_ast.Typename | None


# Expressions nested deeper than this are not evaluated (the walk is recursive).
MAX_DEPTH = 200

_RANK = {"_Bool": 0, "char": 1, "short": 2, "int": 3, "long": 4, "long long": 5, "__int128": 6}


def _rank(t: Int) -> int:
    name = t.cname.replace("unsigned ", "").replace("signed ", "").replace(" int", "") \
        if t.cname not in ("int", "unsigned int", "signed int") else "int"
    return _RANK.get(name, {1: 1, 2: 2, 4: 3, 8: 4, 16: 6}[t.size])


def wrap(value: int, t: Int) -> int:
    bits = t.size * 8
    value &= (1 << bits) - 1
    if t.signed and value >> (bits - 1):
        value -= 1 << bits
    return value


class Evaluator:
    def __init__(self, model: Model, layout) -> None:
        self.model = model
        self.layout = layout
        arch = model.arch
        self.INT = Int(arch.size("int"), True, "int")
        self.UINT = Int(arch.size("int"), False, "unsigned int")
        self.LONG = Int(arch.size("long"), True, "long")
        self.ULONG = Int(arch.size("long"), False, "unsigned long")
        self.LLONG = Int(arch.size("long long"), True, "long long")
        self.ULLONG = Int(arch.size("long long"), False, "unsigned long long")
        self.ioc: IocParts | None = None
        self.type_of = None   # set by the pipeline: Typename -> model Type
        self.depth = 0

    def __call__(self, node: c_ast.Node) -> int:
        v = self.eval(node)
        if not isinstance(v.value, int):
            raise Unevaluable("not an integer")
        return v.value

    # -- conversions
    def promote(self, t: Int) -> Int:
        return self.INT if _rank(t) < _RANK["int"] else t

    def common(self, a: Int, b: Int) -> Int:
        a, b = self.promote(a), self.promote(b)
        if a == b:
            return a
        if a.signed == b.signed:
            return a if _rank(a) >= _rank(b) else b
        u, s = (a, b) if not a.signed else (b, a)
        if _rank(u) >= _rank(s):
            return u
        if s.size > u.size:
            return s
        return Int(s.size, False, "unsigned " + s.cname.replace("signed ", ""))

    # -- literals
    def constant(self, node: c_ast.Constant) -> Value:
        if node.type == "string":
            try:
                return Value(_c_bytes(node.value).decode("utf-8"), None)
            except UnicodeDecodeError:
                raise Unevaluable(f"the string {node.value} is not UTF-8 text") from None
        if node.type == "char":
            raw = _c_bytes(node.value)
            if len(raw) != 1:
                raise Unevaluable(f"the character constant {node.value} is not one byte")
            value = raw[0] - 256 if raw[0] > 127 and self.model.arch.char_signed else raw[0]
            return Value(value, self.INT)
        text = node.value
        m = re.fullmatch(r"(0[xX][0-9a-fA-F]+|0[bB][01]+|0[0-7]*|[1-9]\d*)([uUlL]*)", text)
        if not m:
            raise Unevaluable(f"the literal {text} is not an integer")
        digits, suffix = m.groups()
        if digits.startswith(("0x", "0X", "0b", "0B")):
            value = int(digits, 0)
        elif digits.startswith("0") and len(digits) > 1:
            value = int(digits, 8)
        else:
            value = int(digits)
        suffix = suffix.lower()
        unsigned, longs = "u" in suffix, suffix.count("l")
        decimal = not digits.startswith("0") or digits == "0"
        candidates = [self.INT, self.UINT, self.LONG, self.ULONG, self.LLONG, self.ULLONG]
        candidates = candidates[2 * longs:]
        if unsigned:
            candidates = [c for c in candidates if not c.signed]
        elif decimal and digits != "0":
            candidates = [c for c in candidates if c.signed]
        # Past the last signed type a decimal literal becomes unsigned, as gcc does (with a warning).
        fallback = [c for c in (self.ULONG, self.ULLONG) if c not in candidates]
        for c in candidates + fallback:
            lim = 1 << (c.size * 8 - (1 if c.signed else 0))
            if value < lim:
                return Value(value, c)
        raise Unevaluable(f"the literal {text} does not fit any integer type")

    # -- the expression walker
    def eval(self, node: c_ast.Node) -> Value:
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            raise Unevaluable(f"{type(node).__name__} expressions are not supported")
        if self.depth >= MAX_DEPTH:
            raise Unevaluable(f"the expression nests more than {MAX_DEPTH} operations deep")
        self.depth += 1
        try:
            return method(node)
        finally:
            self.depth -= 1

    def _Constant(self, node: c_ast.Constant) -> Value:
        return self.constant(node)

    def _ID(self, node: c_ast.ID) -> Value:
        if node.name in self.model.enum_values:
            return Value(self.model.enum_values[node.name], self.INT)
        raise Unevaluable(f"names {node.name}, which these headers do not define for "
                          f"{self.model.arch.name}")

    def _Cast(self, node: c_ast.Cast) -> Value:
        t = strip_aligned(self.type_of(node.to_type))
        v = self.eval(node.expr)
        if not isinstance(t, Int) or not isinstance(v.value, int):
            raise Unevaluable("casts to non-integer types are not constants")
        return Value(wrap(v.value, t), t)

    def _UnaryOp(self, node: c_ast.UnaryOp) -> Value:
        if node.op == "sizeof":
            target = node.expr
            if not isinstance(target, c_ast.Typename):
                raise Unevaluable("sizeof of an expression is not supported")
            t = self.type_of(target)
            return Value(self.layout.size_align(t)[0], self.ULONG)
        if node.op == "_Alignof":
            return Value(self.layout.size_align(self.type_of(node.expr))[1], self.ULONG)
        v = self.eval(node.expr)
        if not isinstance(v.value, int) or v.type is None:
            raise Unevaluable(f"unary {node.op} on a string")
        t = self.promote(v.type)
        if node.op == "-":
            return Value(wrap(-v.value, t), t)
        if node.op == "+":
            return Value(v.value, t)
        if node.op == "~":
            return Value(wrap(~v.value, t), t)
        if node.op == "!":
            return Value(int(not v.value), self.INT)
        raise Unevaluable(f"unary {node.op} is not a constant operator")

    def _BinaryOp(self, node: c_ast.BinaryOp) -> Value:
        op = node.op
        a = self.eval(node.left)
        if op in ("&&", "||"):
            if (op == "&&") != bool(a.value):
                return Value(int(bool(a.value)), self.INT)
            return Value(int(bool(self.eval(node.right).value)), self.INT)
        b = self.eval(node.right)
        if not (isinstance(a.value, int) and isinstance(b.value, int) and a.type and b.type):
            raise Unevaluable(f"{op} on strings")
        x, y = a.value, b.value
        if op in ("<<", ">>"):
            t = self.promote(a.type)
            if y < 0 or y >= t.size * 8:
                raise Unevaluable(f"shift by {y} is undefined in C")
            return Value(wrap(x << y if op == "<<" else x >> y, t), t)
        t = self.common(a.type, b.type)
        x, y = wrap(x, t), wrap(y, t)
        if op in ("==", "!=", "<", ">", "<=", ">="):
            r = {"==": x == y, "!=": x != y, "<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}[op]
            return Value(int(r), self.INT)
        if op in ("/", "%"):
            if y == 0:
                raise Unevaluable("division by zero")
            q = abs(x) // abs(y) * (1 if (x < 0) == (y < 0) else -1)
            return Value(wrap(q if op == "/" else x - q * y, t), t)
        ops = {"+": x + y, "-": x - y, "*": x * y, "&": x & y, "|": x | y, "^": x ^ y}
        if op not in ops:
            raise Unevaluable(f"operator {op} is not supported")
        return Value(wrap(ops[op], t), t)

    def _TernaryOp(self, node: c_ast.TernaryOp) -> Value:
        c = self.eval(node.cond)
        a, b = self.eval(node.iftrue), self.eval(node.iffalse)
        if a.type and b.type:
            t = self.common(a.type, b.type)
            chosen = a if c.value else b
            return Value(wrap(int(chosen.value), t), t)
        return a if c.value else b

    def _FuncCall(self, node: c_ast.FuncCall) -> Value:
        if not (isinstance(node.name, c_ast.ID) and node.name.name == IOC_MARKER):
            name = node.name.name if isinstance(node.name, c_ast.ID) else "a function"
            raise Unevaluable(f"calls {name}, which is not a constant")
        args = node.args.exprs
        d, t, nr, size = (self(a) for a in args)
        arg = _sizeof_operand(args[3])
        self.ioc = IocParts(d, t, nr, size, arg)
        shifts = {k: self._macro_int(k) for k in
                  ("_IOC_DIRSHIFT", "_IOC_TYPESHIFT", "_IOC_NRSHIFT", "_IOC_SIZESHIFT")}
        value = (d << shifts["_IOC_DIRSHIFT"]) | (t << shifts["_IOC_TYPESHIFT"]) | \
                (nr << shifts["_IOC_NRSHIFT"]) | (size << shifts["_IOC_SIZESHIFT"])
        return Value(value & 0xFFFFFFFF, self.UINT)

    def _macro_int(self, name: str) -> int:
        c = self.model.constants.get(name)
        if c is None or not isinstance(c.value, int):
            raise Unevaluable(f"needs {name}, which could not be evaluated")
        return c.value


def _sizeof_operand(node: c_ast.Node) -> c_ast.Typename | None:
    while isinstance(node, c_ast.Cast):
        node = node.expr
    if isinstance(node, c_ast.UnaryOp) and node.op == "sizeof" and isinstance(node.expr, c_ast.Typename):
        return node.expr
    return None


def _c_bytes(literal: str) -> bytes:
    """The bytes of a C string or character literal (source bytes the preprocessor
    could not decode arrive as surrogate escapes)."""
    body = literal[1:-1].encode("utf-8", "surrogateescape")
    try:
        return codecs.escape_decode(body)[0]
    except ValueError as e:
        raise Unevaluable(f"the literal {literal} has a bad escape: {e}") from None
