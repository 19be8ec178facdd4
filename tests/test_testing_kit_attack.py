"""Attacks on the test kit: assemble() with malformed input and failing tools, ucalls()
against guests that lie in their records, bad arguments and closed handles, and the
pytest plugin under a user's own conftest and odd devices."""

from __future__ import annotations

import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from kvm_bindings import StaleHandleError
from kvm_bindings.testing import (
    MEMORY_SIZE,
    AssemblyError,
    GuestTimeoutError,
    MissingToolError,
    Sync,
    UcallError,
    assemble,
    load_guest,
    run_guest,
    ucalls,
)
from kvm_bindings.testing import assembler as assembler_module

from .conftest import REQUIRE_KVM, REQUIRE_TOOLS, ROOT, need, set_kit_env

pytest_plugins = ["pytester"]

_HEADER = struct.Struct("<IBBBBIIII4QQ")
MAGIC = 0x4C414355
RECORD = 0x3000         # where the tests below put hand-made records, below the code at 0x1000+


@pytest.fixture(autouse=True)
def toolchain() -> None:
    need(shutil.which("gcc") is not None and shutil.which("ld") is not None,
         "gcc and GNU ld are not installed", REQUIRE_TOOLS or REQUIRE_KVM)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The temp dir assemble() and the tools use, empty: anything left in it is a leak."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


# ---- assemble(): malformed input ------------------------------------------------------------

def test_an_empty_source_is_an_empty_guest(private_tmp):
    assert assemble("") == b""
    assert list(private_tmp.iterdir()) == []


def test_binary_garbage_text_is_an_assembly_error_at_its_line(private_tmp):
    with pytest.raises(AssemblyError) as e:
        assemble("nop\n\x00\x01\xff\xfe garbage \x7f\n")
    assert e.value.errors and e.value.errors[0].line == 2
    assert list(private_tmp.iterdir()) == []


def test_bytes_are_refused_with_a_type_error_naming_them():
    with pytest.raises(TypeError, match="not bytes"):
        assemble(b"nop")  # type: ignore[arg-type]


def test_text_that_is_not_unicode_is_a_value_error():
    with pytest.raises(ValueError, match="not valid Unicode"):
        assemble("nop // \udcff")


def test_a_10_mb_source_assembles():
    code = assemble("nop\n" * (10 << 20 >> 2))
    assert code == b"\x90" * (10 << 20 >> 2)


def test_a_source_with_a_million_errors_gives_a_short_message_quickly(private_tmp):
    with pytest.raises(AssemblyError) as e:
        assemble("bogus\n" * 200_000)
    assert len(e.value.errors) == 1000 and e.value.errors[0].line == 1
    assert len(str(e.value)) < 4000 and "or more errors" in str(e.value)
    assert list(private_tmp.iterdir()) == []


def test_including_a_file_that_is_not_assembly_names_that_file():
    with pytest.raises(AssemblyError) as e:
        assemble('.include "/etc/passwd"')
    assert {err.file for err in e.value.errors} == {"/etc/passwd"}


def test_including_a_missing_file_names_it_at_the_line():
    with pytest.raises(AssemblyError) as e:
        assemble('nop\n#include "no_such_file.h"\n')
    assert "no_such_file.h" in str(e.value) and e.value.errors[0].line == 2


def test_a_path_that_does_not_exist_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        assemble(tmp_path / "missing.S")


def test_a_str_is_always_source_text_never_a_path(tmp_path, monkeypatch):
    (tmp_path / "guest.S").write_text("nop\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssemblyError, match="<string>:1"):
        assemble("guest.S")


@pytest.mark.parametrize("mode", ["bogus", "", 8, True, None])
def test_a_bad_mode_is_a_value_error_naming_it(mode):
    with pytest.raises(ValueError, match="mode must be"):
        assemble("nop", mode=mode)  # type: ignore[arg-type]


@pytest.mark.parametrize("base", [-1, 1 << 32, 1 << 64, True, 0x1000 + 0.5])
def test_a_bad_base_is_a_value_error_naming_it(base):
    with pytest.raises(ValueError, match="base must be"):
        assemble("nop", base=base)  # type: ignore[arg-type]


def test_an_unaligned_base_links_there():
    code = assemble("jmp .\n", base=0x1003)
    assert code == b"\xeb\xfe"
    assert assemble("here: .long here", base=0x1003) == (0x1003).to_bytes(4, "little")


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "\x00"])
def test_a_name_with_control_characters_is_a_value_error(name):
    with pytest.raises(ValueError, match="name must be printable"):
        assemble("nop", name=name)


def test_guest_done_without_the_include_is_an_error_at_its_line():
    with pytest.raises(AssemblyError) as e:
        assemble("nop\nGUEST_DONE\n", include_ucall=False)
    assert [(err.file, err.line) for err in e.value.errors] == [("<string>", 2)]
    assert "guest_done" in e.value.errors[0].message.lower()


# ---- assemble(): the tools ------------------------------------------------------------------

def test_gcc_missing_from_path_is_a_missing_tool_error(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    script = ("from kvm_bindings.testing import assemble, MissingToolError\n"
              "try:\n    assemble('nop')\nexcept MissingToolError as e:\n    print('missing:', e)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": str(empty)}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("missing: assemble() needs 'gcc'")


def test_a_missing_tool_is_named_before_any_temporary_file(monkeypatch, private_tmp, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(MissingToolError, match="'gcc'"):
        assemble("nop")
    assert list(private_tmp.iterdir()) == []


def test_a_tool_that_takes_too_long_is_stopped_with_its_children_and_leaves_nothing(
        monkeypatch, private_tmp):
    monkeypatch.setattr(assembler_module, "_TIMEOUT", 1)
    with pytest.raises(AssemblyError, match="did not finish within 1 s"):
        assemble(".rept 500000000\nnop\n.endr\n")
    assert list(private_tmp.iterdir()) == []
    # gcc's assembler child is gone too, not left running on.
    children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True)
    assert children.stdout == ""


def test_no_temporary_file_is_left_after_success_or_failure(private_tmp, tmp_path):
    source = tmp_path / "guest.S"
    source.write_text("nop\nGUEST_DONE\n")
    assemble(source)
    assemble("nop")
    for bad in ("bogus", '#include "missing.h"', "jmp nowhere"):
        with pytest.raises(AssemblyError):
            assemble(bad)
    assert list(private_tmp.iterdir()) == []


def test_assemble_from_many_threads_at_once_gives_each_its_own_guest(private_tmp):
    sources = {n: f"movl ${n}, %eax\nGUEST_SYNC(%rax)\nGUEST_DONE\n" for n in range(8)}
    serial = {n: assemble(src, name=f"g{n}.S") for n, src in sources.items()}
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def one(n: int) -> None:
        try:
            results[n] = assemble(sources[n], name=f"g{n}.S")
        except BaseException as e:      # noqa: BLE001 - shown by the assert below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n,)) for n in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == serial
    assert len(set(serial.values())) == len(serial)     # the guests do differ
    assert list(private_tmp.iterdir()) == []


# ---- ucalls(): guests whose records lie -----------------------------------------------------

@pytest.fixture
def guest(kit_vm):
    """guest(source, record=None) -> a vCPU about to run source; record (bytes) goes at RECORD
    after the guest is loaded (load_guest writes the page tables at the top of RAM)."""
    made = []

    def go(source: str, record: bytes | None = None, at: int = RECORD):
        vcpu = kit_vm.create_vcpu(len(made))
        made.append(vcpu)
        load_guest(vcpu, assemble(source))
        if record is not None:
            kit_vm.memory.write(at, record)
        return vcpu
    return go


def _out(address: int) -> str:
    return f"movl ${address:#x}, %eax\noutl %eax, $0xe7\nhlt\n"


def _record(command=1, width=8, count=1, line=7, file_at=0, text_at=0, right_at=0, values=(5,),
            magic=MAGIC) -> bytes:
    vals = list(values) + [0] * (4 - len(values))
    return _HEADER.pack(magic, command, width, count, 0, line, file_at, text_at, right_at, *vals, 0)


@pytest.mark.parametrize("address", [0x10000000, MEMORY_SIZE - 8, 0xFFFFFFFF])
def test_a_record_address_outside_ram_is_a_ucall_error_naming_it(guest, address):
    with pytest.raises(UcallError, match=f"address {address:#x}.*does not back"):
        run_guest(guest(_out(address)))


def test_an_unaligned_record_address_is_read_there(guest):
    vcpu = guest(_out(RECORD + 3), _record(command=4), at=RECORD + 3)
    assert run_guest(vcpu) == []                # a Done record, three bytes off: it is one


def test_a_record_with_bad_magic_is_a_ucall_error(guest):
    with pytest.raises(UcallError, match=r"no ucall record at 0x3000 \(magic 0xdeadbeef"):
        run_guest(guest(_out(RECORD), _record(magic=0xDEADBEEF)))


def test_a_huge_value_count_is_a_ucall_error(guest):
    with pytest.raises(UcallError, match="width 8 and 255 values"):
        run_guest(guest(_out(RECORD), _record(count=255)))


def test_a_bad_width_is_a_ucall_error(guest):
    with pytest.raises(UcallError, match="width 3"):
        run_guest(guest(_out(RECORD), _record(width=3)))


def test_an_unknown_command_is_a_ucall_error(guest):
    with pytest.raises(UcallError, match="command 99"):
        run_guest(guest(_out(RECORD), _record(command=99)))


@pytest.mark.parametrize("field", ["file_at", "text_at"])
def test_a_string_pointer_outside_ram_is_a_ucall_error(guest, field):
    with pytest.raises(UcallError, match="string at 0x10000000 is outside guest memory"):
        run_guest(guest(_out(RECORD), _record(command=2, **{field: 0x10000000})))


def test_a_string_running_to_the_end_of_ram_is_a_ucall_error(guest, kit_vm):
    start = MEMORY_SIZE - 10
    vcpu = guest(_out(RECORD), _record(file_at=start))
    kit_vm.memory.write(start, b"A" * 10)       # no NUL before RAM ends
    with pytest.raises(UcallError, match="runs off guest memory after 10 bytes"):
        run_guest(vcpu)


def test_a_string_without_a_nul_in_4_kib_is_a_ucall_error(guest, kit_vm):
    vcpu = guest(_out(RECORD), _record(text_at=0x10000, command=2))
    kit_vm.memory.write(0x10000, b"B" * 8192)
    with pytest.raises(UcallError, match="no NUL in 4096 bytes"):
        run_guest(vcpu)


def test_a_format_that_does_not_fit_its_values_is_a_ucall_error(guest, kit_vm):
    vcpu = guest(_out(RECORD), _record(command=2, text_at=0x10000, count=1))
    kit_vm.memory.write(0x10000, b"%s %s %s\0")
    with pytest.raises(UcallError, match="format"):
        run_guest(vcpu)


# ---- ucalls(): bounds, handlers, arguments, closed handles ----------------------------------

def test_a_spinning_guest_times_out_and_leaves_no_thread(guest):
    threads = threading.active_count()
    with pytest.raises(GuestTimeoutError, match="within 0.2 s"):
        run_guest(guest("1: jmp 1b"), timeout=0.2)
    assert threading.active_count() == threads


def test_a_handler_that_raises_ends_the_run_with_its_exception_and_no_thread(guest):
    threads = threading.active_count()

    def handler(exit):
        raise RuntimeError("the handler broke")

    vcpu = guest("hlt\nGUEST_DONE")
    with pytest.raises(RuntimeError, match="the handler broke"):
        run_guest(vcpu, handler=handler)
    assert threading.active_count() == threads
    assert not vcpu.immediate_exit
    assert run_guest(vcpu) == []                # the guest resumes after its hlt, to GUEST_DONE


@pytest.mark.parametrize("kwargs, kind, text", [
    ({"max_exits": 0}, ValueError, "max_exits must be at least 1, not 0"),
    ({"max_exits": -1}, ValueError, "max_exits must be at least 1, not -1"),
    ({"max_exits": 2.5}, TypeError, "max_exits must be an int"),
    ({"max_exits": True}, TypeError, "max_exits must be an int"),
    ({"timeout": 0}, ValueError, "timeout must be a positive, finite"),
    ({"timeout": -1.0}, ValueError, "timeout must be a positive, finite"),
    ({"timeout": math.nan}, ValueError, "not nan"),
    ({"timeout": math.inf}, ValueError, "not inf"),
    ({"timeout": "1"}, TypeError, "timeout must be a number"),
    ({"port": 0x10000}, ValueError, "port must be"),
    ({"port": -1}, ValueError, "port must be"),
    ({"handler": 5}, TypeError, "handler must be callable"),
])
def test_bad_arguments_are_refused_when_ucalls_is_called(guest, kwargs, kind, text):
    vcpu = guest("GUEST_DONE")
    threads = threading.active_count()
    with pytest.raises(kind, match=text):
        ucalls(vcpu, **kwargs)                  # not at the first next(): at the call
    with pytest.raises(kind, match=text):
        run_guest(vcpu, **kwargs)
    assert threading.active_count() == threads
    assert run_guest(vcpu) == []                # nothing ran: the guest is where it was


def test_a_closed_vcpu_is_a_stale_handle_error(guest):
    vcpu = guest("GUEST_DONE")
    vcpu.close()
    with pytest.raises(StaleHandleError):
        ucalls(vcpu)
    with pytest.raises(StaleHandleError):
        run_guest(vcpu)


def test_a_vcpu_of_a_closed_vm_is_a_stale_handle_error(kvm):
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vm.close()
    with pytest.raises(StaleHandleError):
        ucalls(vcpu)


def test_not_a_vcpu_is_a_type_error():
    with pytest.raises(TypeError, match="runs a Vcpu, not str"):
        ucalls("vcpu")  # type: ignore[arg-type]


def test_a_good_guest_still_runs_after_all_that(guest):
    assert run_guest(guest("GUEST_SYNC($3)\nGUEST_DONE")) == [Sync(3, "<string>", 1)]


# ---- the plugin -----------------------------------------------------------------------------

OWN_VM_CONFTEST = """
import pytest

@pytest.fixture
def vm(kvm):
    with kvm.create_vm() as made:
        made.set_tss_addr(0xFFFBD000)
        made.add_memory(0, 4 << 20)
        yield made
"""

OWN_VM_TEST = """
def test_vcpu_is_built_on_my_vm(vm, vcpu):
    (region,) = vm.memory.regions
    assert region.size == 4 << 20
    assert vcpu.vm is vm and vcpu.id == 0
"""

NOT_A_VM_CONFTEST = """
import pytest

@pytest.fixture
def vm():
    return "not a vm"
"""

USES_VCPU = """
def test_uses_vcpu(vcpu):
    pass
"""

USES_KVM = """
def test_uses_kvm(kvm):
    pass
"""


@pytest.fixture
def plugin_run(pytester, monkeypatch):
    """plugin_run(conftest, test, device=None, require=False) -> a pytest subprocess's result."""
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)

    def run(conftest: str | None, test: str, device: str | None = None, require: bool = False):
        if conftest is not None:
            pytester.makeconftest(conftest)
        pytester.makepyfile(test_user=test)
        set_kit_env(monkeypatch, device, require)
        return pytester.runpytest_subprocess("-rsE", "-p", "no:cacheprovider")
    return run


def test_a_conftest_vm_fixture_gets_the_plugins_vcpu_built_on_it(plugin_run, kvm):
    plugin_run(OWN_VM_CONFTEST, OWN_VM_TEST).assert_outcomes(passed=1)


def test_a_conftest_vm_that_is_not_a_vm_makes_vcpu_a_type_error_saying_so(plugin_run, kvm):
    result = plugin_run(NOT_A_VM_CONFTEST, USES_VCPU)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*TypeError*vm gave str*"])


@pytest.fixture
def odd_device(tmp_path, request):
    if request.param == "fifo":
        os.mkfifo(tmp_path / "fifo")
        return str(tmp_path / "fifo")
    return {"directory": str(tmp_path), "zero": "/dev/zero"}[request.param]


@pytest.mark.parametrize("odd_device", ["directory", "fifo", "zero"], indirect=True)
def test_a_device_that_is_not_kvm_skips_with_the_reason(plugin_run, odd_device):
    result = plugin_run(None, USES_KVM, device=odd_device)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines([f"SKIPPED*no usable KVM device at {odd_device}*"])


def test_a_device_that_is_not_kvm_fails_under_require_kvm(plugin_run):
    result = plugin_run(None, USES_VCPU, device="/dev/null", require=True)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no usable KVM device at /dev/null*not a KVM device*"
                                 "KVM_BINDINGS_REQUIRE_KVM=1*"])


def test_a_source_file_path_is_shown_as_given(tmp_path):
    source = Path(tmp_path / "bad.S")
    source.write_text("nop\nbogus\n")
    with pytest.raises(AssemblyError, match=f"{source}:2"):
        assemble(source)
