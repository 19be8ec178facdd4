"""Mutated real headers: the generator exits cleanly either way.

Each mutation of a slice of the shipped x86_64 headers (deletions, duplications,
garbage tokens, truncation, unbalanced braces, huge numbers, deep nesting, bad
bytes, Python keywords as names) must give either a module that imports, or a
GeneratorError whose message starts with path:line. Seeded, so a failure
reproduces; the generator runs in-process (two workers), and the modules are
imported in one child process.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import re
import signal
import subprocess
import sys
import traceback
from collections import Counter
from pathlib import Path

import pytest

from codegen import headers

SEED = 20240525
MUTATIONS = 320
PER_CASE_SECONDS = 20
LOCATED = re.compile(r"^[^\s:][^:\n]*:\d+: \S")

_KINDS = ("delete", "duplicate", "garbage", "truncate", "unbalance", "huge", "nest", "bytes",
          "keyword")
_GARBAGE = ["}", "{", ";", "(", ")", "[", "]", "struct", "union", "enum", "int", ":", "*", ",",
            "=", "typedef", "...", "@", "$", "'", '"', "\\", "0x", "__attribute__((packed))",
            "_Static_assert(0, \"no\");", "#define", "static inline int f(void) { return 0; }",
            "__u8 x:9;", "int;", "__u8 a[-1];", "sizeof(struct kvm_run)", "#if 0", "#endif"]
_HUGE = ["0xffffffffffffffffffff", "99999999999999999999", "-1", "(1ULL << 63)", "1e999",
         "0x7fffffffffffffff", "(-2147483647 - 1)", "'ab'", "0777777777777777777777"]
_NAMES = ["class", "lambda", "import", "None", "def", "_fields_", "_pack_", "_anonymous_",
          "_align_", "ctypes", "__init__", "from_buffer", "RENAMED", "type", "mro", "int",
          "Capability", "__name__", "_pad0", "_bits0"]


def _corpus(real: headers.HeaderSet) -> bytes:
    """The first 300 lines of asm/kvm.h and linux/kvm.h up to struct kvm_run: real text, small
    enough that 300 generations fit in the time a test may take."""
    asm = (real.include_dirs[0] / "asm" / "kvm.h").read_text().splitlines(keepends=True)
    top = (real.include_dirs[1] / "linux" / "kvm.h").read_text().splitlines(keepends=True)
    text = "#include <linux/types.h>\n#include <linux/ioctl.h>\n" + "".join(asm[9:300]) + \
        "".join(top[18:216])
    return text.encode()


def mutate(rng: random.Random, text: bytes) -> tuple[str, bytes]:
    kind = rng.choice(_KINDS)
    lines = text.split(b"\n")
    i = rng.randrange(len(lines))
    if kind == "delete":
        del lines[i:i + rng.choice([1, 1, 2, 5, 20])]
    elif kind == "duplicate":
        n = rng.choice([1, 1, 3, 10])
        lines[i:i] = lines[i:i + n]
    elif kind == "garbage":
        line = lines[i]
        at = rng.randrange(len(line) + 1)
        lines[i] = line[:at] + b" " + rng.choice(_GARBAGE).encode() + b" " + line[at:]
    elif kind == "truncate":
        return kind, text[:rng.randrange(len(text))]
    elif kind == "unbalance":
        lines.insert(i, rng.choice([b"{", b"}", b"struct kvm_fuzz {", b"};", b"(", b")"]))
    elif kind == "huge":
        numbers = [(j, m) for j, line in enumerate(lines) for m in re.finditer(rb"\b\d\w*", line)]
        j, m = rng.choice(numbers)
        lines[j] = lines[j][:m.start()] + rng.choice(_HUGE).encode() + lines[j][m.end():]
    elif kind == "nest":
        depth = rng.choice([2, 10, 30, 63, 65, 200, 1000])
        if rng.random() < 0.5:
            inner = b"struct { " * depth + b"__u8 x;" + b" } y;" * depth
            lines.insert(i, b"struct kvm_fuzz_nest { " + inner + b" };")
        else:
            lines.insert(i, b"#define KVM_FUZZ_DEEP " + b"(" * depth + b"1" + b")" * depth)
    elif kind == "bytes":
        line = lines[i]
        at = rng.randrange(len(line) + 1)
        junk = rng.choice([b"\xff", b"\x80\x81", b"\x00", b"/* \xfe\xff */", b'"\xff"', b"\xc3\xa9"])
        lines[i] = line[:at] + junk + line[at:]
    else:   # keyword: a C name spelled like something Python or the module needs
        ids = [(j, m) for j, line in enumerate(lines) if not line.startswith(b"#include")
               for m in re.finditer(rb"\b[a-z_]\w*\b", line)
               if m.group() not in (b"struct", b"union", b"enum", b"define", b"typedef")]
        j, m = rng.choice(ids)
        lines[j] = lines[j][:m.start()] + rng.choice(_NAMES).encode() + lines[j][m.end():]
    return kind, b"\n".join(lines)


def _alarm(signum, frame):
    raise TimeoutError(f"took more than {PER_CASE_SECONDS} s")


def _run_one(job: tuple[int, str, bytes, str, tuple[str, ...]]) -> tuple[int, str, str]:
    """(index, "ok" / "error" / "FAIL", detail): generate one mutated header set."""
    from codegen import pipeline
    from codegen.arches import get_arch
    from codegen.errors import GeneratorError

    index, kind, text, work, real_dirs = job
    case = Path(work) / f"case{index}"
    (case / "inc" / "linux").mkdir(parents=True)
    (case / "inc" / "linux" / "kvm.h").write_bytes(text)
    hs = headers.HeaderSet("fuzz", (case / "inc", *map(Path, real_dirs)), "fuzz")
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(PER_CASE_SECONDS)
    try:
        files = pipeline.generate(hs, get_arch("x86_64"), with_facts=False)
    except GeneratorError as e:
        message = str(e)
        return index, ("error" if LOCATED.match(message) else "FAIL"), message
    except BaseException:
        return index, "FAIL", traceback.format_exc(limit=-4)
    finally:
        signal.alarm(0)
    pkg = case / "out" / f"fuzz{index}"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name, body in files.items():
        (pkg / name).write_text(body, encoding="utf-8")
    return index, "ok", str(pkg)


_IMPORT_ALL = """
import ctypes, importlib, json, sys
failed = {}
for path in sys.argv[1:]:
    parent, name = path.rsplit("/", 1)
    sys.path.insert(0, parent)
    try:
        mod = importlib.import_module(name + ".x86_64")
        importlib.import_module(name + ".x86_64_enums")
        for key, py in mod.RENAMED.items():
            if "." not in key and not key.startswith("enum ") and not hasattr(mod, py):
                raise AssertionError(f"RENAMED says {key} is {py}, which the module lacks")
        for cls in mod.C_TYPES.values():
            ctypes.sizeof(cls)
    except BaseException as e:
        failed[path] = f"{type(e).__name__}: {e}"
    sys.path.remove(parent)
print(json.dumps(failed))
"""


def test_mutated_headers_give_an_importable_module_or_a_located_error(header_set, tmp_path):
    real = header_set(headers.shipped_version())
    base = _corpus(real)
    rng = random.Random(SEED)
    jobs = []
    for index in range(MUTATIONS):
        kind, text = mutate(rng, base)
        if rng.random() < 0.25:   # now and then, two mutations at once
            kind2, text = mutate(rng, text)
            kind = f"{kind}+{kind2}"
        jobs.append((index, kind, text, str(tmp_path), tuple(map(str, real.include_dirs))))

    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_run_one, jobs, chunksize=8)

    kinds = {j[0]: j[1] for j in jobs}
    failures = [f"case {i} ({kinds[i]}): {detail}" for i, outcome, detail in results
                if outcome == "FAIL"]
    built = [detail for _, outcome, detail in results if outcome == "ok"]
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL, *built], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path, why in json.loads(proc.stdout).items():
        failures.append(f"{path}: does not import: {why}")

    outcomes = Counter(outcome for _, outcome, _ in results)
    by_kind = Counter((kinds[i].split("+")[0], outcome) for i, outcome, _ in results)
    print(f"\n{MUTATIONS} mutations (seed {SEED}): {outcomes['ok']} importable modules, "
          f"{outcomes['error']} located errors, {outcomes['FAIL']} failures")
    for kind in _KINDS:
        print(f"  {kind:10} ok {by_kind[(kind, 'ok')]:3}  error {by_kind[(kind, 'error')]:3}  "
              f"FAIL {by_kind[(kind, 'FAIL')]}")
    assert not failures, "\n\n".join(failures[:10])
    assert outcomes["ok"] > 30 and outcomes["error"] > 30   # both ways were exercised


@pytest.mark.parametrize("message, located", [
    ("linux/kvm.h:3: cannot parse: before: c\n    int b c;", True),
    ("asm/kvm.h:12: duplicate member 'a'", True),
    ("cannot parse: At end of input", False),
    ("linux/kvm.h: a comment in struct kvm_run names KVM_EXIT_IO", False),
    ("the C probe did not compile with gcc:\nprobe.c:3:1: error: x", False),
])
def test_the_fuzz_oracle_tells_a_located_error_from_one_without_a_place(message, located):
    assert bool(LOCATED.match(message)) is located


def test_the_mutations_are_the_same_every_run():
    base = b"struct kvm_a { __u32 a; __u8 b[4]; };\n#define KVM_X 12\n" * 20
    first = [mutate(random.Random(SEED), base) for _ in range(3)]
    assert first == [mutate(random.Random(SEED), base) for _ in range(3)]
    assert len({text for _, text in first}) == 1 and first[0][1] != base
