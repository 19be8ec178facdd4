"""kvm_bindings.testing: the plugin's fixtures, assemble(), the ucall protocol, and the kit
working from an installed wheel outside this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from kvm_bindings import HltExit, IoExit
from kvm_bindings.testing import (
    AssemblyError,
    Done,
    GuestAssertionError,
    GuestTimeoutError,
    MissingToolError,
    Print,
    SourceError,
    Sync,
    UnexpectedExitError,
    assemble,
    load_guest,
    run_guest,
    ucalls,
)

from .conftest import REQUIRE_KVM, REQUIRE_TOOLS, ROOT, need, set_kit_env

pytest_plugins = ["pytester"]

REGISTER = {"long": "%rax", "protected": "%eax", "real": "%ax"}


@pytest.fixture(autouse=True)
def toolchain() -> None:
    need(shutil.which("gcc") is not None and shutil.which("ld") is not None,
         "gcc and GNU ld are not installed", REQUIRE_TOOLS or REQUIRE_KVM)


@pytest.fixture
def start(kit_vm):
    """start(source, mode="long") -> a vCPU about to run the assembled source."""
    def go(source: str, mode: str = "long", **kw):
        vcpu = kit_vm.create_vcpu(len(kit_vm.vcpus))
        load_guest(vcpu, assemble(source, mode=mode, **kw), mode=mode)
        return vcpu
    return go


def line_of(source: str, text: str) -> int:
    """The 1-based line of source holding text (exactly once)."""
    hits = [n for n, line in enumerate(source.splitlines(), 1) if text in line]
    assert len(hits) == 1, (text, hits)
    return hits[0]


# ---- the plugin -----------------------------------------------------------------------------

def test_the_plugin_is_registered_through_the_pytest11_entry_point():
    (ep,) = [e for e in entry_points(group="pytest11") if e.name == "kvm_bindings"]
    assert ep.value == "kvm_bindings.testing.plugin"


def test_importing_kvm_bindings_does_not_import_pytest():
    code = "import sys, kvm_bindings, kvm_bindings.testing, kvm_bindings.x86; print('pytest' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


FIXTURE_TEST = """
import sys

def test_unused():
    # The plugin is inert: nothing of the runtime is loaded for a test without its fixtures.
    assert "kvm_bindings.vm" not in sys.modules

def test_fixtures(kvm, vm, vcpu):
    (region,) = vm.memory.regions
    assert (region.guest_phys_addr, region.size) == (0, 2 << 20)
    assert vcpu.vm is vm and vm.kvm is kvm and vcpu.id == 0
    # pytest does not rewrite the runtime's modules (the plugin's distribution is marked).
    import kvm_bindings.vm
    assert "@pytest_ar" not in vars(kvm_bindings.vm)
"""


@pytest.fixture
def fixture_run(pytester, monkeypatch):
    """fixture_run(device, require) -> the outcome of FIXTURE_TEST in a pytest subprocess."""
    pytester.makepyfile(test_fixtures=FIXTURE_TEST)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)

    def run(device: str | None, require: bool):
        set_kit_env(monkeypatch, device, require)
        return pytester.runpytest_subprocess("-rsE", "-p", "no:cacheprovider")
    return run


def test_fixtures_give_a_vm_with_2_mib_and_its_vcpu(fixture_run, kvm):
    result = fixture_run(None, require=True)
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize("device", ["/nonexistent/kvm", "/dev/null"])
def test_fixtures_skip_with_the_reason_where_the_device_is_missing_or_not_kvm(fixture_run, device):
    result = fixture_run(device, require=False)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([f"SKIPPED*no usable KVM device at {device}*"])


def test_fixtures_fail_instead_under_kvm_bindings_require_kvm(fixture_run):
    result = fixture_run("/nonexistent/kvm", require=True)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*no usable KVM device at /nonexistent/kvm*KVM_BINDINGS_REQUIRE_KVM=1*"])


# ---- assemble() -----------------------------------------------------------------------------

def test_assemble_links_flat_at_base():
    code = assemble("movl $here, %eax\nhere: hlt\n", include_ucall=False, base=0x2000)
    assert code == b"\xb8\x05\x20\x00\x00\xf4"      # mov $0x2005, %eax; hlt
    assert assemble("nop", mode="real", include_ucall=False) == b"\x90"
    assert assemble("push %ax", mode=16, include_ucall=False) == b"\x50"
    assert assemble("push %ax", mode="protected", include_ucall=False) == b"\x66\x50"


def test_an_assembler_error_names_the_source_line_and_shows_it():
    source = "    nop\n    nop\n    bogus %rax\n    nop\n"
    with pytest.raises(AssemblyError) as e:
        assemble(source)
    assert [(x.file, x.line) for x in e.value.errors] == [("<string>", 3)]
    assert ">    3 |     bogus %rax" in str(e.value)
    assert "no such instruction" in str(e.value)


def test_an_error_inside_a_ucall_macro_is_shown_where_the_source_uses_it():
    source = "\n".join(["nop"] * 20 + ["GUEST_SYNC(%eax)   // not a 64-bit register"] + ["nop"] * 200)
    with pytest.raises(AssemblyError) as e:
        assemble(source, name="mine.S")
    assert {(x.file, x.line) for x in e.value.errors} == {("mine.S", 21)}
    assert ">   21 | GUEST_SYNC(%eax)" in str(e.value)


def test_a_preprocessor_error_and_a_file_source_name_their_line(tmp_path):
    path = tmp_path / "guest.S"
    path.write_text("nop\n// comment\n#include \"no_such_header.h\"\nnop\n")
    with pytest.raises(AssemblyError) as e:
        assemble(path)
    assert [(x.file, x.line) for x in e.value.errors] == [(str(path), 3)]


def test_includes_are_found_beside_a_source_file(tmp_path):
    (tmp_path / "values.h").write_text("#define ANSWER 42\n")
    (tmp_path / "guest.S").write_text('#include "values.h"\n.byte ANSWER\n')
    assert assemble(tmp_path / "guest.S", include_ucall=False) == b"\x2a"


def test_a_missing_tool_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingToolError, match="'gcc'"):
        assemble("nop")


def test_source_errors_are_plain_data():
    assert SourceError("a.S", 3, "x") == SourceError("a.S", 3, "x")


# ---- ucalls ---------------------------------------------------------------------------------

UCALLS = """\
    mov $0x1234, REG
    GUEST_SYNC(REG)
    GUEST_SYNC($7)
    GUEST_PRINT("plain text")
    GUEST_PRINTF("value %d and %#x", REG, $255)
    GUEST_SYNC(REG)         // still 0x1234: the ucalls keep every register
    GUEST_DONE
"""


@pytest.mark.parametrize("mode", ["long", "protected", "real"])
def test_each_ucall_reports_its_value_file_and_line(start, mode):
    source = UCALLS.replace("REG", REGISTER[mode])
    events = list(ucalls(start(source, mode, name="ucalls.S")))
    at = [line_of(source, "mov $0x1234") + 1, line_of(source, "GUEST_SYNC($7)"),
          line_of(source, "plain text"), line_of(source, "GUEST_PRINTF"),
          line_of(source, "still 0x1234"), line_of(source, "GUEST_DONE")]
    assert events == [Sync(0x1234, "ucalls.S", at[0]), Sync(7, "ucalls.S", at[1]),
                      Print("plain text", "ucalls.S", at[2]),
                      Print("value 4660 and 0xff", "ucalls.S", at[3]),
                      Sync(0x1234, "ucalls.S", at[4]), Done("ucalls.S", at[5])]


def test_a_source_file_is_reported_by_its_path(start, tmp_path):
    path = tmp_path / "guest.S"
    path.write_text("nop\nGUEST_SYNC($1)\nnop\nnop\nGUEST_DONE\n")
    vcpu = start(path)
    assert list(ucalls(vcpu)) == [Sync(1, str(path), 2), Done(str(path), 5)]


def test_values_are_the_full_width_of_the_mode(start):
    events = run_guest(start("movabs $0x123456789abcdef0, %rbx\nGUEST_SYNC(%rbx)\nGUEST_SYNC($-1)\n"
                             "GUEST_DONE"))
    assert [e.value for e in events] == [0x123456789ABCDEF0, (1 << 64) - 1]
    events = run_guest(start("GUEST_SYNC($-1)\nGUEST_DONE", "real"))
    assert [e.value for e in events] == [0xFFFF]


def test_sync_print_and_done_keep_the_flags(start):
    events = run_guest(start("stc\nGUEST_SYNC($1)\nGUEST_PRINT(\"x\")\nGUEST_ASSERT(c)\n"
                             "clc\nGUEST_SYNC($2)\nGUEST_ASSERT(nc)\nGUEST_DONE\n"))
    assert [type(e) for e in events] == [Sync, Print, Sync]


# (macro, left, right, holds) for 64-bit operands
COMPARISONS = [
    ("EQ", 5, 5, True), ("EQ", 5, 6, False), ("NE", 5, 6, True), ("NE", 5, 5, False),
    ("LT", 5, 6, True), ("LT", 6, 6, False), ("LE", 6, 6, True), ("LE", 7, 6, False),
    ("GT", 7, 6, True), ("GT", 6, 6, False), ("GE", 6, 6, True), ("GE", 5, 6, False),
    ("LT", 1, -1, True),        # unsigned: -1 is the largest
]
SYMBOL = {"EQ": "==", "NE": "!=", "LT": "<", "LE": "<=", "GT": ">", "GE": ">="}
NEGATION = {"==": "!=", "!=": "==", "<": ">=", "<=": ">", ">": "<=", ">=": "<"}


@pytest.mark.parametrize(("macro", "left", "right", "holds"), COMPARISONS)
def test_guest_assert_comparisons_pass_and_fail(start, macro, left, right, holds):
    source = (f"mov ${left}, %rax\nmov ${right}, %rbx\nGUEST_ASSERT_{macro}(%rax, %rbx)\n"
              "GUEST_SYNC(%rax)\nGUEST_SYNC(%rbx)\nGUEST_DONE\n")
    vcpu = start(source, name="cmp.S")
    if holds:
        mask = (1 << 64) - 1
        assert [e.value for e in run_guest(vcpu)] == [left & mask, right & mask]
        return
    with pytest.raises(GuestAssertionError) as e:
        run_guest(vcpu)
    op = SYMBOL[macro]
    assert str(e.value) == (f"guest assertion failed at cmp.S:3: %rax {op} %rbx "
                            f"({left:#x} {NEGATION[op]} {right:#x})")
    assert (e.value.file, e.value.line, e.value.values) == ("cmp.S", 3, (left, right))


@pytest.mark.parametrize("mode", ["long", "protected", "real"])
def test_guest_assert_eq_with_an_immediate_in_each_mode(start, mode):
    reg = REGISTER[mode]
    source = f"mov $3, {reg}\nGUEST_ASSERT_EQ({reg}, $3)\nGUEST_ASSERT_EQ({reg}, $4)\nGUEST_DONE\n"
    with pytest.raises(GuestAssertionError, match=rf"at <string>:3: \{reg} == \$4 \(0x3 != 0x4\)$"):
        run_guest(start(source, mode))


def test_guest_assert_on_a_condition_code(start):
    source = "mov $1, %rax\ntest %rax, %rax\nGUEST_ASSERT(nz)\nGUEST_ASSERT(z)\nGUEST_DONE\n"
    with pytest.raises(GuestAssertionError, match=r"at <string>:4: GUEST_ASSERT\(z\)"):
        run_guest(start(source))


def test_guest_fail_formats_its_message(start):
    with pytest.raises(GuestAssertionError) as e:
        run_guest(start('nop\nGUEST_FAIL("bad value %d at %#x", $3, $0x10)\nGUEST_DONE\n'))
    assert str(e.value) == "guest assertion failed at <string>:2: bad value 3 at 0x10"


def test_the_guest_stops_after_a_failed_assertion(start):
    """A failed assertion halts the guest: a host that resumes it gets HLT, not the code after."""
    vcpu = start("GUEST_FAIL(\"stop\")\nGUEST_SYNC($1)\nGUEST_DONE\n")
    with pytest.raises(GuestAssertionError):
        run_guest(vcpu)
    assert isinstance(vcpu.run(), HltExit)


# ---- other exits, and the bound on a run ----------------------------------------------------

def test_other_exits_go_to_the_handler(start):
    vcpu = start("mov $0x5a, %al\nout %al, $0x80\nGUEST_SYNC($1)\nGUEST_DONE\n")
    seen = []
    events = run_guest(vcpu, handler=lambda exit: seen.append((exit.port, bytes(exit.data))) or True)
    assert seen == [(0x80, b"\x5a")]
    assert events == [Sync(1, "<string>", 3)]


def test_an_exit_no_handler_takes_fails_with_the_exit_shown(start):
    vcpu = start("nop\nhlt\nGUEST_DONE\n")
    with pytest.raises(UnexpectedExitError, match=r"unexpected exit <HltExit HLT>, guest rip=0x") as e:
        run_guest(vcpu, handler=lambda exit: isinstance(exit, IoExit))
    assert isinstance(e.value.exit, HltExit)


def test_a_guest_that_spins_is_kicked_after_the_timeout(start):
    vcpu = start("1: jmp 1b\n")
    began = time.monotonic()
    with pytest.raises(GuestTimeoutError, match=r"did not reach GUEST_DONE within 0.3 s, guest rip=0x100"):
        run_guest(vcpu, timeout=0.3)
    assert 0.3 <= time.monotonic() - began < 5
    assert vcpu.immediate_exit is False       # the kick was consumed: the vCPU runs again
    assert vcpu.get_regs().rip in (0x1000, 0x1002)


def test_a_guest_that_never_finishes_is_stopped_after_max_exits(start):
    vcpu = start("1: out %al, $0x80\njmp 1b\n")
    count = []
    with pytest.raises(GuestTimeoutError, match="within 50 exits"):
        run_guest(vcpu, handler=lambda exit: count.append(exit) or True, max_exits=50)
    assert len(count) == 50


def test_the_timeout_counts_guest_running_time_only(start):
    """Time the caller spends between events does not use up the guest's budget."""
    vcpu = start("GUEST_SYNC($1)\nGUEST_SYNC($2)\nGUEST_DONE\n")
    events = []
    for event in ucalls(vcpu, timeout=0.5):
        events.append(event)
        time.sleep(0.3)
    assert [type(e) for e in events] == [Sync, Sync, Done]


# ---- examples and the installed wheel -------------------------------------------------------

def test_the_example_suite_passes(kvm):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "examples/kit_tests"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 passed" in r.stdout


WHEEL_TEST = '''
import sys
from pathlib import Path

import kvm_bindings
from kvm_bindings.testing import Sync, assemble, load_guest, run_guest

HERE = Path(__file__).parent


def test_runs_from_site_packages():
    assert kvm_bindings.__file__.startswith(sys.prefix), kvm_bindings.__file__


def test_guest_passes(vcpu):
    load_guest(vcpu, assemble(HERE / "guest.S"))
    assert run_guest(vcpu) == [Sync(42, str(HERE / "guest.S"), 3)]


def test_guest_fails(vcpu):
    load_guest(vcpu, assemble("mov $1, %rax\\nGUEST_ASSERT_EQ(%rax, $2)\\nGUEST_DONE\\n", name="bad.S"))
    run_guest(vcpu)
'''


def _copy_source(dest: Path) -> None:
    """What a clean clone holds for a build, without the venv, caches and build output."""
    skip = {".git", ".venv", ".tox", "build", "dist", "__pycache__", ".hypothesis", ".mypy_cache",
            ".pytest_cache", ".ruff_cache", "tests", "bench", "headers"}
    shutil.copytree(ROOT, dest, ignore=lambda folder, names: {
        n for n in names if n in skip or n.endswith(".egg-info")})
    (dest / "headers").mkdir()
    shutil.copy(ROOT / "headers" / "manifest.json", dest / "headers" / "manifest.json")


def test_the_kit_works_from_an_installed_wheel(kvm, tmp_path):
    """A wheel in a clean venv: the fixtures, assemble() and the ucalls, run from outside the repo."""
    def run(cmd: list, cwd: Path, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                              timeout=600, **kw)

    _copy_source(tmp_path / "src")
    r = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
             "-w", tmp_path / "dist", tmp_path / "src"], tmp_path)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("kvm_bindings-*.whl")
    assert run([sys.executable, "-m", "venv", tmp_path / "venv"], tmp_path).returncode == 0
    python = tmp_path / "venv" / "bin" / "python"
    r = run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, "pytest"],
            tmp_path)
    need(r.returncode == 0, f"could not install pytest into a fresh venv: {r.stderr[-300:]}",
         REQUIRE_TOOLS)
    work = tmp_path / "work"
    work.mkdir()
    (work / "test_guest.py").write_text(WHEEL_TEST)
    (work / "guest.S").write_text("// reports 42\nmov $42, %rbx\nGUEST_SYNC(%rbx)\nGUEST_DONE\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_ADDOPTS")}
    env["KVM_BINDINGS_REQUIRE_KVM"] = "1"       # a skip would pass unseen
    r = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_guest.py"], work, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed, 2 passed" in r.stdout, r.stdout
    assert "guest assertion failed at bad.S:2: %rax == $2 (0x1 != 0x2)" in r.stdout, r.stdout
