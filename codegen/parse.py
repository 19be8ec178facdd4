"""Stage 2: parse the preprocessed headers with pycparser.

pycparser reads standard C only, so the GCC extensions that change layout are
lifted out first and kept as data: __attribute__((aligned(N))) and packed,
located by the declarator or struct they belong to, and __int128 spelled as a
typedef the model knows. Any other attribute is an error, never a silent drop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pycparser import c_ast, c_parser

from .errors import GeneratorError
from .preprocess import Preprocessed

INT128 = "__kvmgen_int128"
UINT128 = "__kvmgen_uint128"
PRELUDE_FILE = "<kvmgen-prelude>"
_PRELUDE = (f'# 1 "{PRELUDE_FILE}"\ntypedef int {INT128}; typedef unsigned int {UINT128};\n')

_TOKEN = re.compile(r'''
    (?P<marker>^\#[^\n]*$)
  | (?P<ws>[ \t\r\n]+)
  | (?P<id>[A-Za-z_]\w*)
  | (?P<num>\.?\d(?:[\w.]|[eEpP][+-])*)
  | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<punct>.)
''', re.X | re.M)

# Brackets nested deeper than this are refused: pycparser parses recursively, and no
# header needs a tenth of it.
MAX_NESTING = 64
_OPENING, _CLOSING = "([{", ")]}"

_INT128_SPELLINGS = [
    (re.compile(r"\bunsigned\s+__int128\b|\b__uint128_t\b"), UINT128),
    (re.compile(r"\b(?:signed\s+)?__int128\b|\b__int128_t\b"), INT128),
]


@dataclass(frozen=True)
class Attribute:
    """A layout attribute and the declarator or record it applies to."""

    kind: str            # "aligned" or "packed"
    value: int | None    # the alignment for aligned (None: the target's largest)
    target: str          # "decl" (a declarator, by its name's position) or "record"
    file: str
    line: int
    column: int


@dataclass
class Parsed:
    ast: c_ast.FileAST
    attributes: list[Attribute]
    text: str


class _Positions:
    """Maps offsets in the preprocessed text to pycparser's (file, line, column)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.map: list[tuple[str, int]] = []   # per physical line: (file, logical line)
        cur_file, cur_line = "<unknown>", 1
        for start in self.line_starts:
            end = text.find("\n", start)
            line = text[start:] if end < 0 else text[start:end]
            m = re.match(r'^# (\d+) "([^"]*)"', line)
            if m:
                self.map.append((cur_file, 0))
                cur_file, cur_line = m.group(2), int(m.group(1))
                continue
            self.map.append((cur_file, cur_line))
            cur_line += 1

    def at(self, offset: int) -> tuple[str, int, int]:
        import bisect
        i = bisect.bisect_right(self.line_starts, offset) - 1
        f, ln = self.map[i]
        return f, ln, offset - self.line_starts[i] + 1

    def line_text(self, offset: int) -> str:
        import bisect
        i = bisect.bisect_right(self.line_starts, offset) - 1
        end = self.text.find("\n", self.line_starts[i])
        return self.text[self.line_starts[i]:end if end >= 0 else None]


def _tokens(text: str) -> list[tuple[str, str, int]]:
    return [(m.lastgroup or "", m.group(), m.start()) for m in _TOKEN.finditer(text)
            if m.lastgroup not in ("ws", "marker")]


def _balanced(toks: list[tuple[str, str, int]], i: int) -> int:
    """Index just past the parenthesised group that starts at toks[i]."""
    depth = 0
    for j in range(i, len(toks)):
        if toks[j][1] == "(":
            depth += 1
        elif toks[j][1] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    raise IndexError


def _open_bracket(toks: list[tuple[str, str, int]], j: int, opening: str, closing: str) -> int:
    """Index of the bracket that opens the group closed at toks[j]."""
    depth = 0
    while j >= 0:
        depth += toks[j][1] == closing
        depth -= toks[j][1] == opening
        if depth == 0:
            return j
        j -= 1
    raise IndexError


def _split_attributes(inner: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def lift_attributes(text: str) -> tuple[str, list[Attribute]]:
    """Blank out every __attribute__ and say what each one applied to."""
    pos = _Positions(text)
    toks = _tokens(text)
    out = list(text)
    attrs: list[Attribute] = []
    i = 0
    while i < len(toks):
        kind, val, off = toks[i]
        if val not in ("__attribute__", "__attribute"):
            i += 1
            continue
        f, ln, _ = pos.at(off)
        try:
            end = _balanced(toks, i + 1)
        except IndexError:
            raise GeneratorError("unbalanced __attribute__", f, ln, pos.line_text(off)) from None
        stop = toks[end - 1][2] + 1
        inner = text[toks[i + 1][2]:stop].strip()
        if not (inner.startswith("((") and inner.endswith("))")):
            raise GeneratorError("malformed __attribute__", f, ln, pos.line_text(off))
        target = _attribute_target(toks, i, pos)
        for spec in _split_attributes(inner[2:-2]):
            attrs.append(_attribute(spec, target, f, ln, pos.line_text(off)))
        for k in range(off, stop):
            if out[k] != "\n":
                out[k] = " "
        i = end
    return "".join(out), attrs


def _attribute(spec: str, target: tuple[str, str, int, int], f: str, ln: int,
               line: str) -> Attribute:
    m = re.fullmatch(r"(?:__)?(\w+?)(?:__)?\s*(?:\((.*)\))?", spec, re.S)
    name = m.group(1) if m else spec
    if name == "packed" and not (m and m.group(2)):
        return Attribute("packed", None, *target)
    if name == "aligned":
        arg = m.group(2) if m else None
        if arg is None:
            return Attribute("aligned", None, *target)
        try:
            return Attribute("aligned", int(arg.strip().rstrip("uUlL"), 0), *target)
        except ValueError:
            raise GeneratorError(f"aligned() with a non-literal argument {arg!r} is not supported",
                                 f, ln, line) from None
    raise GeneratorError(f"unsupported attribute {spec!r}: the generator does not know how it "
                         f"changes layout", f, ln, line)


def _attribute_target(toks: list[tuple[str, str, int]], i: int,
                      pos: _Positions) -> tuple[str, str, int, int]:
    """The declarator name or record keyword an attribute at toks[i] belongs to."""
    # Among the specifiers ("__u64 __attribute__((aligned(8))) name;"), it belongs
    # to the declarator that follows.
    after = _balanced(toks, i + 1)
    while after < len(toks) and toks[after][1] == "*":
        after += 1
    if after < len(toks) and toks[after][0] == "id" and i > 0 and toks[i - 1][0] == "id" \
            and toks[i - 1][1] not in ("struct", "union", "enum"):
        return ("decl", *pos.at(toks[after][2]))
    j = i - 1
    while j >= 0 and toks[j][1] == "]":   # "name[3] __attribute__": back to the name
        j = _open_bracket(toks, j, "[", "]") - 1
    if j >= 0 and toks[j][0] == "id" and toks[j][1] not in ("struct", "union", "enum"):
        # "struct tag __attribute__" marks the record, "type name __attribute__" the declarator
        if j > 0 and toks[j - 1][1] in ("struct", "union"):
            return ("record", *pos.at(toks[j][2]))
        return ("decl", *pos.at(toks[j][2]))
    if j >= 0 and toks[j][1] in ("struct", "union"):
        # "struct __attribute__((x)) tag {" or "struct __attribute__((x)) {": the tag, or the brace
        return ("record", *pos.at(toks[after][2]))
    if j >= 0 and toks[j][1] == "}":
        j = _open_bracket(toks, j, "{", "}")
        k = j - 1
        if k >= 0 and toks[k][0] == "id" and toks[k][1] not in ("struct", "union"):
            return ("record", *pos.at(toks[k][2]))   # the tag
        return ("record", *pos.at(toks[j][2]))       # anonymous: its brace
    f, ln, _ = pos.at(toks[i][2])
    raise GeneratorError("__attribute__ in a position the generator does not support",
                         f, ln, pos.line_text(toks[i][2]))


def _nesting_too_deep(toks: list[tuple[str, str, int]]) -> int | None:
    """Offset of the first bracket nested deeper than MAX_NESTING, if any."""
    depth = 0
    for kind, val, off in toks:
        if kind != "punct":
            continue
        if val in _OPENING:
            depth += 1
            if depth > MAX_NESTING:
                return off
        elif val in _CLOSING:
            depth = max(depth - 1, 0)
    return None


def check_nesting(text: str) -> None:
    off = _nesting_too_deep(_tokens(text))
    if off is not None:
        pos = _Positions(text)
        f, ln, _ = pos.at(off)
        raise GeneratorError(f"brackets nested more than {MAX_NESTING} deep", f, ln,
                             pos.line_text(off))


_ATTRIBUTE_WORDS = ("__attribute__", "__attribute")


def blank_function_bodies(text: str) -> str:
    """Empty every function body at file scope ("f(...) { ... }" becomes "f(...) {}").

    A body is code, not declarations: the bindings only list the function, and a
    body may hold what pycparser cannot read (asm, statement expressions).
    """
    toks = _tokens(text)
    out = list(text)
    depth = 0
    i = 0
    while i < len(toks):
        val = toks[i][1]
        if val == "{" and depth == 0 and _is_body(toks, i):
            j, level = i, 0
            while j < len(toks):
                level += toks[j][1] == "{"
                level -= toks[j][1] == "}"
                if level == 0:
                    break
                j += 1
            if j == len(toks):
                return "".join(out)   # unbalanced: the parser says where
            for k in range(toks[i][2] + 1, toks[j][2]):
                if out[k] != "\n":
                    out[k] = " "
            i = j + 1
            continue
        depth += (val == "{") - (val == "}")
        i += 1
    return "".join(out)


def _is_body(toks: list[tuple[str, str, int]], i: int) -> bool:
    """Whether the "{" at toks[i] opens a function body: it follows a parameter list
    (perhaps then attributes), not a struct, union or enum keyword or tag."""
    j = i - 1
    while j >= 0 and toks[j][1] == ")":
        try:
            k = _open_bracket(toks, j, "(", ")")
        except IndexError:
            return False
        if k > 1 and toks[k - 1][1] == "(" and toks[k - 2][1] in _ATTRIBUTE_WORDS:
            j = k - 3
            continue
        if k > 0 and toks[k - 1][1] in _ATTRIBUTE_WORDS:
            j = k - 2
            continue
        return k > 0 and toks[k - 1][0] in ("id", "punct") and toks[k - 1][1] not in \
            ("struct", "union", "enum", "=", ",", "(", "{", ";")
    return False


def spell_int128(text: str) -> str:
    for pattern, name in _INT128_SPELLINGS:
        text = pattern.sub(name, text)
    return text


def _parse(text: str, parser: c_parser.CParser | None = None) -> c_ast.FileAST:
    return (parser or c_parser.CParser()).parse(text, "<kvmgen>")


def _parse_error(e: c_parser.ParseError, parser: c_parser.CParser, lookup,
                 text: str = "") -> GeneratorError:
    m = re.match(r"^(.*?):(\d+)(?::\d+)?: (.*)$", str(e), re.S)
    msg = m.group(3) if m else str(e).split(": ", 1)[-1]
    f, ln = (m.group(1), int(m.group(2))) if m else (None, None)
    # pycparser does not always say where it stopped; the token it stopped at does.
    try:
        tok = parser._peek()
        after = parser._peek(2)
    except Exception:  # a private API: fall back to pycparser's own message
        tok = after = None
    if tok is not None and getattr(tok, "lineno", None):
        f, ln = tok.filename, tok.lineno
        if tok.type == "ID" and after is not None and after.type in ("ID", "TIMES"):
            msg = f"unknown type name {tok.value!r}"
    if (f is None or ln is None) and text.strip():
        # "At end of input": the input stopped too soon; say where it stopped.
        toks = _tokens(text)
        if toks:
            f, ln, _ = _Positions(text).at(toks[-1][2])
            msg += " (a declaration or brace is not closed)" if "end of input" in msg else ""
    if f is None or ln is None:
        return GeneratorError(f"cannot parse: {msg}")
    return GeneratorError(f"cannot parse: {msg}", f, ln, lookup(f, ln))


def parse(pp: Preprocessed, source_line) -> Parsed:
    """Parse the translation unit; source_line(file, line) gives text for messages."""
    check_nesting(pp.tu)
    text, attrs = lift_attributes(spell_int128(blank_function_bodies(pp.tu)))
    text = _PRELUDE + text
    parser = c_parser.CParser()
    try:
        ast = _parse(text, parser)
    except c_parser.ParseError as e:
        raise _parse_error(e, parser, source_line, text) from None
    return Parsed(ast, attrs, text)


def parse_expressions(expansions: dict[str, str], typedef_names: list[str]
                      ) -> tuple[dict[str, c_ast.Node], dict[str, str]]:
    """Parse each macro expansion as a C expression.

    Returns (name -> expression, name -> reason it is not an expression).
    """
    bad: dict[str, str] = {}
    names = []
    type_words = set(typedef_names) | {"struct", "union", "enum", "void", "char", "short", "int",
                                       "long", "unsigned", "signed", "_Bool", "const", "volatile"}
    for name, exp in expansions.items():
        first = exp.split(maxsplit=1)[0] if exp.strip() else ""
        if "__attribute__" in exp:
            bad[name] = f"expands to a type with attributes, not a value: {exp}"
        elif _nesting_too_deep(_tokens(exp)) is not None:
            bad[name] = f"its expansion nests brackets more than {MAX_NESTING} deep"
        elif not first:
            bad[name] = "expands to nothing after its own expansion"
        elif first in type_words:
            bad[name] = f"expands to a type, not a value: {exp}"
        else:
            names.append(name)
    head = "".join(f"typedef int {t};\n" for t in typedef_names)

    def try_parse(idx: list[int]) -> c_ast.FileAST | None:
        lines = [f"long __kvmgen_{i} = ({spell_int128(expansions[names[i]])});" for i in idx]
        try:
            return _parse(head + "\n".join(lines))
        except c_parser.ParseError:
            return None

    def bad_lines(idx: list[int]) -> list[int]:
        # pycparser does not always say where an expression went wrong: bisect.
        if try_parse(idx) is not None:
            return []
        if len(idx) == 1:
            return idx
        half = len(idx) // 2
        return bad_lines(idx[:half]) + bad_lines(idx[half:])

    ast = try_parse(list(range(len(names))))
    if ast is None:
        for i in bad_lines(list(range(len(names)))):
            bad[names[i]] = f"does not expand to a C expression: {expansions[names[i]]}"
        names = [n for n in names if n not in bad]
        ast = try_parse(list(range(len(names))))
        assert ast is not None
    exprs = {}
    for node in ast.ext:
        if isinstance(node, c_ast.Decl) and node.name.startswith("__kvmgen_"):
            exprs[names[int(node.name[len("__kvmgen_"):])]] = node.init
    return exprs, bad
