"""Attacks on the conformance command: odd devices, unwritable JUnit files, concurrent runs,
Ctrl-C mid-run, fd and mapping accounting, odd detail strings, and the ioctl probe's
promises (no writable pointer, no fd left behind, no other fd touched)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvm_bindings import Kvm, abi
from kvm_bindings import conformance as live
from kvm_bindings.__main__ import main
from kvm_bindings.conformance import Report
from kvm_bindings.conformance import _behaviour as behaviour
from kvm_bindings.conformance import _ioctls as ioctls_check
from kvm_bindings.conformance import _kernel as kernel_check

from .conftest import ROOT

ODD = 'quote " apostrophe \' <tag> & amp; \\ backslash, non-ASCII é 漢 😀, escape \x1b[31m, NUL \x00'


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:         # the listing's own fd, gone already
            pass
    return out


def _maps() -> list[str]:
    with open("/proc/self/maps") as f:
        return sorted(line.split(None, 5)[0] + " " + line.split()[1] for line in f)


def _canned(*statuses: str, detail: str = "detail") -> Report:
    report = Report(kernel="Linux test", device="/dev/kvm")
    for n, status in enumerate(statuses):
        report.add(f"check{n}", "api", status, detail)  # type: ignore[arg-type]
    return report


@pytest.fixture
def narrow(monkeypatch):
    """A run of the api and capability checks only (the ioctl and behaviour groups take ~10 s)."""
    monkeypatch.setattr(ioctls_check, "run_checks", lambda kvm, report: None)
    monkeypatch.setattr(behaviour, "run_checks", lambda kvm, report: None)


# ---- --device -------------------------------------------------------------------------------

@pytest.fixture
def odd_paths(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return {"a directory": (str(tmp_path), "Is a directory"),
            "a FIFO": (str(fifo), "not a character device"),
            "/dev/zero": ("/dev/zero", "not a KVM device"),
            "/dev/null": ("/dev/null", "not a KVM device"),
            "a missing path": (str(tmp_path / "missing"), "does not exist")}


@pytest.mark.parametrize("what", ["a directory", "a FIFO", "/dev/zero", "/dev/null", "a missing path"])
def test_a_device_that_is_not_kvm_exits_2_with_the_reason_and_no_fd_left(odd_paths, what, capsys):
    path, reason = odd_paths[what]
    before = _fds()
    assert main(["conformance", "--device", path]) == 2
    err = capsys.readouterr().err
    assert "cannot run the conformance checks" in err and path in err and reason in err
    assert _fds() == before


def test_a_fifo_device_does_not_hang_the_command(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)         # no writer: an open for reading alone would block for ever
    proc = subprocess.run([sys.executable, "-m", "kvm_bindings", "conformance", "--device", str(fifo)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 2 and "not a character device" in proc.stderr


def test_a_symlink_to_the_device_is_followed_and_named_as_given(tmp_path, narrow, kvm):
    link = tmp_path / "kvm"
    link.symlink_to("/dev/kvm")
    report = live.run(str(link))
    assert report.device == str(link)
    assert [c.status for c in report.checks if c.name == "api_version"] == ["pass"]
    assert report.exit_code == 0


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run as another user")
def test_a_device_without_permission_exits_2_saying_so(kvm):
    if os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is open to everyone here")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-m", "kvm_bindings", "conformance"],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 2, proc.stderr
    assert "Permission denied" in proc.stderr and "/dev/kvm" in proc.stderr


# ---- --junit --------------------------------------------------------------------------------

@pytest.mark.parametrize("statuses, code", [(("pass", "skip"), 0), (("pass", "fail"), 1)])
@pytest.mark.parametrize("where", ["a directory", "a missing folder"])
def test_an_unwritable_junit_file_prints_the_report_then_exits_2(monkeypatch, tmp_path, where,
                                                                 statuses, code):
    monkeypatch.setattr(live, "run", lambda device: _canned(*statuses))
    target = str(tmp_path) if where == "a directory" else str(tmp_path / "no" / "such.xml")
    out, err = io.StringIO(), io.StringIO()
    assert live.cli(junit=target, out=out, err=err) == 2
    assert "2 checks:" in out.getvalue()                      # the report came out first
    assert f"cannot write the JUnit file {target}" in err.getvalue()
    # ... and with a writable file the same report gives its own status.
    good = tmp_path / "ok.xml"
    assert live.cli(junit=str(good), out=io.StringIO(), err=io.StringIO()) == code
    assert ET.parse(good).getroot().get("tests") == "2"


def test_the_command_with_an_unwritable_junit_file_prints_the_report_then_exits_2(monkeypatch,
                                                                                  tmp_path, capsys):
    monkeypatch.setattr(live, "run", lambda device: _canned("pass"))
    assert main(["conformance", "--junit", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "1 checks:" in captured.out and str(tmp_path) in captured.err


# ---- odd detail strings ---------------------------------------------------------------------

def test_json_and_junit_stay_valid_for_any_detail(kvm, tmp_path):
    def odd_pass(vm):
        return ODD

    def odd_fail(vm):
        raise behaviour.CheckFailed(ODD)

    report = Report(kernel="Linux test", device="/dev/kvm")
    behaviour.run_checks(kvm, report, {"odd <pass> & \"more\"": odd_pass, "odd_fail": odd_fail})
    assert [c.status for c in report.checks] == ["pass", "fail"]
    checks = json.loads(report.to_json())["checks"]
    assert [c["detail"] for c in checks] == [ODD, ODD]
    assert checks[0]["name"] == "odd <pass> & \"more\""
    root = ET.fromstring(report.to_junit().encode("utf-8"))
    cases = root.findall(".//testcase")
    assert cases[0].get("name") == "odd <pass> & \"more\""
    shown = ODD.replace("\x1b", "\\x1b").replace("\x00", "\\x00")   # XML cannot hold these
    assert cases[0].find("system-out").text == shown
    assert cases[1].find("failure").get("message") == shown
    assert cases[1].find("failure").text == shown


def test_a_lone_surrogate_in_a_detail_still_writes_a_junit_file(monkeypatch, tmp_path):
    monkeypatch.setattr(live, "run", lambda device: _canned("fail", detail="bad byte \udcff"))
    out, target = io.StringIO(), tmp_path / "r.xml"
    assert live.cli(as_json=True, junit=str(target), out=out, err=io.StringIO()) == 1
    assert json.loads(out.getvalue())["checks"][0]["detail"] == "bad byte \udcff"
    assert ET.parse(target).find(".//failure").get("message") == "bad byte \\udcff"


# ---- the ioctl probe ------------------------------------------------------------------------

def test_the_probe_passes_only_0_or_the_no_access_page_and_leaves_no_fd_or_mapping(monkeypatch, kvm):
    real = ioctls_check._ioctl
    seen: list[tuple[int, int]] = []
    protection: dict[int, str] = {}

    def recording(fd, number, arg):
        seen.append((number, arg))
        if arg and arg not in protection:
            with open("/proc/self/maps") as f:
                for line in f:
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    if lo <= arg < hi:
                        protection[arg] = line.split()[1]
        return real(fd, number, arg)

    monkeypatch.setattr(ioctls_check, "_ioctl", recording)
    gc.collect()
    fds, maps = _fds(), _maps()
    unknown, results = ioctls_check.answers(kvm)
    gc.collect()
    assert _fds() == fds and _maps() == maps
    assert len(seen) > 4 * 100
    pointers = {arg for _, arg in seen if arg}
    assert len(pointers) == 1 and list(protection.values()) == ["---p"]
    # Every struct-passing ioctl got the page; every value-passing one got 0.
    sizes = {io.number: io.size for io in ioctls_check.kvm_ioctls().values()}
    assert all(bool(arg) == bool(sizes[n]) for n, arg in seen if n in sizes)
    # The probes that make fds did make them (and they were closed: the accounting above).
    assert results["KVM_CREATE_VM"]["system"] == 0
    if kvm.check_extension(abi.Capability.BINARY_STATS_FD):
        assert results["KVM_GET_STATS_FD"]["vm"] == results["KVM_GET_STATS_FD"]["vcpu"] == 0


def test_an_ioctl_that_unexpectedly_makes_an_fd_has_it_closed_and_no_other_fd_is_touched(monkeypatch, kvm):
    real = ioctls_check._ioctl
    foreign: list[int] = []

    def succeeds_with_a_vm(fd, number, arg):
        foreign.append(os.open("/dev/null", os.O_RDONLY))   # another thread's file, opened meanwhile
        return real(kvm.fd, abi.KVM_CREATE_VM, 0)          # a new VM fd, from any number

    monkeypatch.setattr(ioctls_check, "_ioctl", succeeds_with_a_vm)
    before = _fds()
    try:
        with ioctls_check._no_access_page() as fault:
            for size in (0, 8):
                assert ioctls_check._probe(kvm.fd, ioctls_check.unused_number(), size, fault) == 0
        after = _fds()
        new = {fd: link for fd, link in after.items() if fd not in before}
        assert not any("kvm-vm" in link for link in new.values()), new
        assert set(after) - set(before) == set(foreign)      # the other files stay open
    finally:
        for fd in foreign:
            os.close(fd)


def test_a_kvm_fd_made_on_a_number_another_thread_just_freed_is_still_closed(monkeypatch, kvm):
    # Another thread closes its file between the probe's listing and its ioctl; the kernel
    # gives the new KVM fd that very number, which was open before: it is closed all the
    # same (it was a pipe then), and the probe closes nothing else.
    real = ioctls_check._ioctl
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    r, w = os.pipe()                          # r: the lowest free number, listed as open
    made: list[int] = []

    def other_thread_closes_then_stats(fd, number, arg):
        os.close(r)
        made.append(real(vcpu.fd, abi.KVM_GET_STATS_FD, 0))
        return made[-1]
    monkeypatch.setattr(ioctls_check, "_ioctl", other_thread_closes_then_stats)
    try:
        before = _fds()
        assert ioctls_check._probe(kvm.fd, ioctls_check.unused_number(), 0, 0) == 0
        assert made == [r]                    # the kernel took the number back at once
        after = _fds()
        assert r not in after, after[r]       # the stats fd did not stay open
        assert set(before) - set(after) == {r} and os.fstat(w)
    finally:
        os.close(w)
        vm.close()


@pytest.mark.parametrize("raises", [False, True])
def test_no_collection_can_free_a_listed_fd_before_the_probes_ioctl(monkeypatch, kvm, raises):
    # A collection between the listing and the ioctl could close a garbage object's KVM fd
    # that was listed as open; the kernel would then return that very number for the fd the
    # probe made, which would look old and stay open (seen once: a vCPU stats fd left open
    # for later tests). So the collector is off from the listing to the ioctl, and back on
    # after, whatever the ioctl does.
    real_list, real_ioctl = ioctls_check._open_fds, ioctls_check._ioctl
    seen: list[tuple[str, bool]] = []

    def listing():
        seen.append(("list", gc.isenabled()))
        return real_list()

    def probing(fd, number, arg):
        seen.append(("ioctl", gc.isenabled()))
        if raises:
            raise KeyboardInterrupt
        return real_ioctl(fd, number, arg)
    monkeypatch.setattr(ioctls_check, "_open_fds", listing)
    monkeypatch.setattr(ioctls_check, "_ioctl", probing)
    assert gc.isenabled()
    with contextlib.ExitStack() as stack:
        if raises:
            stack.enter_context(pytest.raises(KeyboardInterrupt))
        ioctls_check._probe(kvm.fd, ioctls_check.unused_number(), 0, 0)
    assert seen == [("list", False), ("ioctl", False)]
    assert gc.isenabled()
    gc.disable()                                # and left off where it was off
    try:
        seen.clear()
        with contextlib.ExitStack() as stack:
            if raises:
                stack.enter_context(pytest.raises(KeyboardInterrupt))
            ioctls_check._probe(kvm.fd, ioctls_check.unused_number(), 0, 0)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_probe_leaves_an_fd_that_is_not_a_kvm_one_alone(monkeypatch, kvm):
    made: list[int] = []

    def returns_a_file(fd, number, arg):
        made.append(os.open("/dev/null", os.O_RDONLY))
        return made[-1]

    monkeypatch.setattr(ioctls_check, "_ioctl", returns_a_file)
    try:
        ioctls_check._probe(kvm.fd, ioctls_check.unused_number(), 0, 0)
        os.fstat(made[0])       # still open
    finally:
        for fd in made:
            os.close(fd)


def test_other_threads_files_survive_a_probe_run(monkeypatch, kvm):
    # A subset of the ioctls, the fd-making ones among them, keeps this short.
    names = ["KVM_CREATE_VM", "KVM_CREATE_VCPU", "KVM_GET_STATS_FD", "KVM_GET_API_VERSION",
             "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE", "KVM_RUN", "KVM_GET_REGS"]
    subset = {n: io for n, io in ioctls_check.kvm_ioctls().items() if n in names}
    monkeypatch.setattr(ioctls_check, "kvm_ioctls", lambda: subset)
    stop, broken = threading.Event(), []

    def other():
        while not stop.is_set():
            r, w = os.pipe()
            time.sleep(0)
            try:
                os.write(w, b"x")
                assert os.read(r, 1) == b"x"
            except OSError as e:
                broken.append(e)
            for fd in (r, w):
                try:
                    os.close(fd)
                except OSError as e:
                    broken.append(e)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        for _ in range(10):
            ioctls_check.answers(kvm)
    finally:
        stop.set()
        thread.join()
    assert broken == []


def test_two_runs_at_once_in_threads_agree_and_leave_nothing_open(monkeypatch, kvm):
    names = ["KVM_CREATE_VM", "KVM_CREATE_VCPU", "KVM_GET_STATS_FD", "KVM_GET_API_VERSION",
             "KVM_RUN", "KVM_SET_USER_MEMORY_REGION"]
    subset = {n: io for n, io in ioctls_check.kvm_ioctls().items() if n in names}
    monkeypatch.setattr(ioctls_check, "kvm_ioctls", lambda: subset)
    gc.collect()
    fds = _fds()
    reports: list[Report] = []
    errors: list[BaseException] = []

    def one():
        try:
            reports.append(live.run())
        except BaseException as e:      # noqa: BLE001 - shown by the assert below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(reports) == 2
    a, b = ([(c.name, c.status) for c in r.checks] for r in reports)
    assert a == b and reports[0].exit_code == 0, reports[0].table()
    assert {"KVM_CREATE_VM", "pio_out_in", "dirty_log"} <= {n for n, _ in a}
    gc.collect()
    assert _fds() == fds


def test_two_runs_at_once_in_processes_both_pass(tmp_path):
    script = ("import sys\nfrom kvm_bindings.conformance import _ioctls\n"
              "everything = _ioctls.kvm_ioctls()\n"
              "_ioctls.kvm_ioctls = lambda: {n: everything[n] for n in list(everything)[:40]}\n"
              "from kvm_bindings.conformance import run\n"
              "sys.exit(run().exit_code)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [code for code, _ in results] == [0, 0], results


# ---- Ctrl-C ---------------------------------------------------------------------------------

CTRL_C = """
import gc, os, sys
from kvm_bindings import conformance as live
from kvm_bindings.conformance import _behaviour
if sys.argv[1] == "behaviour":      # skip the ioctls; a guest that spins until the guard
    from kvm_bindings.conformance import _ioctls
    _ioctls.run_checks = lambda kvm, report: None
    _behaviour.GUARD_SECONDS = 60
    _behaviour.guest = lambda name: b"\\xeb\\xfe"
def fds():
    out = {}
    for f in os.listdir("/proc/self/fd"):
        try:
            out[f] = os.readlink("/proc/self/fd/" + f)
        except OSError:
            pass
    return out
def maps():
    # What a run maps itself: kvm_run (named after the vCPU fd), 64 KiB of guest RAM per
    # VM, the probe's no-access page. Heap arenas the interpreter grows are not its own.
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms, *_rest = line.split()
            start, end = (int(x, 16) for x in span.split("-"))
            if "kvm" in line or (len(_rest) == 3 and end - start == 0x10000) or \
                    (perms == "---p" and end - start == 0x1000):
                out.append(span)
    return sorted(out)
import threading
warm = threading.Thread(target=lambda: None)   # a thread's stack and malloc arena stay mapped
warm.start()
warm.join()
fds_before, maps_before = fds(), maps()
print("ready", flush=True)
code = live.cli()
gc.collect()
assert threading.active_count() == 1, threading.enumerate()
new = {f: link for f, link in fds().items() if fds_before.get(f) != link}
print("status", code, "new fds", new, "new mappings", sorted(set(maps()) - set(maps_before)), flush=True)
"""


@pytest.mark.parametrize("phase, delay", [("ioctls", 0.3), ("ioctls", 1.5), ("behaviour", 1.0)])
def test_ctrl_c_mid_run_exits_130_and_leaves_no_fd_or_mapping(kvm, phase, delay):
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C, phase], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "conformance: interrupted" in err and "Traceback" not in err
    assert out.strip() == "status 130 new fds {} new mappings []"


# ---- the narrowed pieces fail where they should (the attacks above can fail) ----------------

def test_the_kernel_checks_report_a_wrong_mmap_size(monkeypatch, kvm):
    monkeypatch.setattr(Kvm, "get_vcpu_mmap_size", lambda self: ctypes.sizeof(abi.kvm_run) - 1)
    report = Report(kernel="k", device="/dev/kvm")
    kernel_check.run_checks(kvm, report)
    assert [c.status for c in report.checks if c.name == "vcpu_mmap_size"] == ["fail"]


def test_the_junit_escape_is_only_for_what_xml_cannot_hold():
    from kvm_bindings.conformance.report import _xml_text
    assert _xml_text("tab\tnewline\n <&> é 😀") == "tab\tnewline\n <&> é 😀"
    assert _xml_text("\x00\x08\x1f\ud800\ufffe") == "\\x00\\x08\\x1f\\ud800\\ufffe"


def test_the_report_is_written_whole_to_a_writable_junit_file(monkeypatch, tmp_path):
    monkeypatch.setattr(live, "run", lambda device: _canned("pass", "fail", "skip"))
    target = Path(tmp_path / "r.xml")
    assert live.cli(junit=str(target), out=io.StringIO(), err=io.StringIO()) == 1
    root = ET.parse(target).getroot()
    assert (root.get("tests"), root.get("failures")) == ("3", "1")
