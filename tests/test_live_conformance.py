"""python -m kvm_bindings conformance: the running kernel checked against the bindings.

It must run clean on this host, and each way a check can fail must make it fail: the
mismatches here are injected (a wrong expected value, a guest that does something else,
a capability taken away), and each must turn into exactly the failure or skip it causes.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from kvm_bindings import abi
from kvm_bindings import conformance as live
from kvm_bindings.__main__ import main
from kvm_bindings.conformance import Report
from kvm_bindings.conformance import _behaviour as behaviour
from kvm_bindings.conformance import _ioctls as ioctls_check

pytestmark = pytest.mark.usefixtures("kvm")


def statuses(report: Report) -> dict[str, tuple[str, str]]:
    """{check name: (status, detail)}."""
    return {c.name: (c.status, c.detail) for c in report.checks}


def test_the_command_runs_clean_on_this_host_and_shows_each_group_with_counts():
    r = subprocess.run([sys.executable, "-m", "kvm_bindings", "conformance"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for group in ("api", "capabilities", "ioctls", "behaviour"):
        assert f"\n{group}: " in r.stdout and " 0 failed" in r.stdout.split(f"\n{group}: ")[1]
    assert "PASS  irqfd" in r.stdout and "passing checks not listed" in r.stdout


def test_json_lists_every_check_with_its_group_status_and_detail(capsys):
    assert main(["conformance", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    checks = report["checks"]
    assert {c["group"] for c in checks} == {"api", "capabilities", "ioctls", "behaviour"}
    assert all(set(c) == {"name", "group", "status", "detail"} for c in checks)
    assert {c["status"] for c in checks} <= {"pass", "skip"}
    names = {c["name"] for c in checks}
    assert {f"KVM_CAP_{cap.name}" for cap in abi.Capability} <= names
    assert set(behaviour.CHECKS) <= names
    by_name = {c["name"]: c for c in checks}
    assert by_name["KVM_CAP_USER_MEMORY"]["detail"] == "1"       # what KVM_CHECK_EXTENSION said
    assert report["counts"]["behaviour"]["pass"] + report["counts"]["behaviour"]["skip"] == \
        len(behaviour.CHECKS)


def test_junit_file_is_xml_a_ci_system_reads_with_one_testcase_per_check(tmp_path, capsys):
    junit = tmp_path / "conformance.xml"
    assert main(["conformance", "--json", "--junit", str(junit)]) == 0
    checks = json.loads(capsys.readouterr().out)["checks"]
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites" and int(root.get("tests")) == len(checks)
    cases = [(s.get("name"), c.get("name")) for s in root.iter("testsuite") for c in s.iter("testcase")]
    assert cases == [(c["group"], c["name"]) for c in checks]
    for suite in root.iter("testsuite"):
        assert int(suite.get("tests")) == len(suite.findall("testcase"))
        assert int(suite.get("skipped")) == len(suite.findall("testcase/skipped"))
        assert int(suite.get("failures")) == len(suite.findall("testcase/failure")) == 0


def test_a_wrong_api_version_fails_and_exits_1(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(abi, "KVM_API_VERSION", abi.KVM_API_VERSION + 1)
    junit = tmp_path / "j.xml"
    assert main(["conformance", "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    # The bindings refuse a device of another API version; that refusal is the failure.
    speaks = f"kernel speaks KVM API 12, these bindings {abi.KVM_API_VERSION}"
    assert "FAIL  api_version" in out and speaks in out and "1 checks: 0 passed, 1 failed" in out
    failure = ET.parse(junit).getroot().find("testsuite[@name='api']/testcase[@name='api_version']/failure")
    assert failure is not None and speaks in failure.get("message")


def test_a_guest_that_does_something_else_fails_its_check_and_only_that_one(monkeypatch):
    real = behaviour.guest
    monkeypatch.setattr(behaviour, "guest", lambda name: real("hlt" if name == "port_io" else name))
    got = statuses(live.run())
    assert got["pio_out_in"][0] == "fail" and "expected OUT to port 0x3f8" in got["pio_out_in"][1]
    assert got["pio_string"][0] == "fail"
    assert all(got[name][0] == "pass" for name in behaviour.CHECKS if not name.startswith("pio"))


def test_a_kernel_that_reports_the_wrong_dirty_pages_fails_naming_them(monkeypatch):
    from kvm_bindings.vm import Vm
    real = Vm.get_dirty_log

    def one_page_lost(self, region):
        bitmap = real(self, region)
        return [gpa for gpa in bitmap][1:]
    monkeypatch.setattr(Vm, "get_dirty_log", one_page_lost)
    status, detail = statuses(live.run())["dirty_log"]
    assert status == "fail" and detail == "dirty pages [1, 5, 31, 32, 63], but the guest wrote " \
                                          "[0, 1, 5, 31, 32, 63]"


def test_a_missing_capability_is_a_skip_naming_it_and_the_run_still_passes(monkeypatch):
    from kvm_bindings.vm import Vm
    real = Vm.check_extension
    monkeypatch.setattr(Vm, "check_extension",
                        lambda self, cap: 0 if cap == abi.Capability.IOEVENTFD else real(self, cap))
    report = live.run()
    assert statuses(report)["ioeventfd"] == ("skip", "this kernel lacks KVM_CAP_IOEVENTFD")
    assert report.exit_code == 0


def test_a_guest_that_never_gets_there_is_stopped_and_fails(monkeypatch):
    real = behaviour.guest
    monkeypatch.setattr(behaviour, "GUARD_SECONDS", 0.5)
    monkeypatch.setattr(behaviour, "guest", lambda name: b"\xeb\xfe" if name == "hlt" else real(name))
    status, detail = statuses(live.run())["hlt"]            # jmp . for ever
    assert status == "fail" and "INTR" in detail


@pytest.mark.parametrize("device", ["/dev/null", "/nonexistent/kvm", "regular file"])
def test_a_path_that_is_not_a_kvm_device_exits_2_saying_so(device, tmp_path):
    if device == "regular file":
        device = str(tmp_path / "kvm")
        open(device, "w").close()
    r = subprocess.run([sys.executable, "-m", "kvm_bindings", "conformance", "--device", device],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: cannot run the conformance checks:") and device in r.stderr


def test_a_run_leaves_no_fd_open():
    before = sorted(os.listdir("/proc/self/fd"))
    live.run()
    assert sorted(os.listdir("/proc/self/fd")) == before


# ---- the ioctls group: how an answer is judged ------------------------------------------

ENOTTY, EINVAL, EFAULT = errno.ENOTTY, errno.EINVAL, errno.EFAULT
UNKNOWN = {"system": EINVAL, "vm": ENOTTY, "vcpu": EINVAL, "device": ENOTTY}   # as this host


def _io(fd=None, capability=None):
    return abi.Ioctl("KVM_TEST", 0xAEFF, "none", 0, None, None, fd, capability)


def _answers(**kinds):
    return {k: kinds.get(k, UNKNOWN[k]) for k in ("system", "vm", "vcpu", "device")}


@pytest.mark.parametrize("io, answers, gate, status, says", [
    pytest.param(_io(("vcpu",)), _answers(vcpu=EFAULT), None, "pass", "known on vcpu fds (EFAULT), as",
                 id="known where the header says"),
    pytest.param(_io(("vm", "vcpu")), _answers(vm=EFAULT), None, "skip",
                 "the header names vcpu fds (EINVAL), where this probe cannot tell",
                 id="one of two named kinds cannot tell"),
    pytest.param(_io(("vm",)), _answers(vcpu=EFAULT), None, "fail",
                 "the header names vm fds (ENOTTY), which do not know it; vcpu fds (EFAULT) do",
                 id="known only on another kind"),
    pytest.param(_io(("vm",), ("KVM_CAP_X",)), _answers(), {"KVM_CAP_X": 1}, "fail",
                 "KVM_CAP_X is 1, but vm fds (ENOTTY) do not know it", id="gated but unknown"),
    pytest.param(_io(("vm",), ("KVM_CAP_X",)), _answers(), {"KVM_CAP_X": 0}, "pass",
                 "not offered (KVM_CAP_X is 0)", id="not offered and unknown"),
    pytest.param(_io(("vm",), ("KVM_CAP_X",)), _answers(vm=EFAULT), {"KVM_CAP_X": 0}, "pass",
                 "note: known on vm fds (EFAULT), though KVM_CAP_X is 0",
                 id="known though not offered"),
    pytest.param(_io(("vm",)), _answers(), None, "skip", "names no capability",
                 id="ungated and unknown"),
    pytest.param(_io(("vcpu",)), _answers(), None, "skip", "this probe cannot tell",
                 id="EINVAL like an unknown number"),
    pytest.param(_io(None), _answers(system=0), None, "pass", "known on system fds (succeeded) "
                 "(the header names no fd kind)", id="no kind named, known somewhere"),
    pytest.param(_io(None, ("KVM_CAP_X",)), _answers(), {"KVM_CAP_X": 3}, "fail",
                 "KVM_CAP_X is 3, but no fd kind knows it", id="no kind named, gated, unknown"),
    pytest.param(_io(("device",)), _answers(device=None), None, "skip",
                 "no device fd here to ask", id="no fd of that kind"),
])
def test_each_answer_is_judged_against_the_headers_fd_kind_and_capability(io, answers, gate,
                                                                           status, says):
    got = ioctls_check.judge(io, answers, UNKNOWN, gate)
    assert got[0] == status and says in got[1], got


def test_a_number_the_kernel_does_not_know_under_an_offered_capability_fails_the_run(monkeypatch):
    fake = abi.Ioctl("KVM_NOT_A_REAL_IOCTL", ioctls_check.unused_number(), "none", 0, None, None,
                     ("vm",), ("KVM_CAP_USER_MEMORY",))
    real = ioctls_check.kvm_ioctls
    monkeypatch.setattr(ioctls_check, "kvm_ioctls", lambda: {**real(), fake.name: fake})
    report = live.run()
    assert statuses(report)["KVM_NOT_A_REAL_IOCTL"] == (
        "fail", "KVM_CAP_USER_MEMORY is 1, but vm fds (ENOTTY) do not know it")
    assert report.exit_code == 1
    assert statuses(report)["KVM_RUN"][0] == "pass"


def test_every_kvm_ioctl_is_judged_and_the_others_are_not(capsys):
    assert main(["conformance", "--json"]) == 0
    judged = {c["name"] for c in json.loads(capsys.readouterr().out)["checks"]
              if c["group"] == "ioctls"}
    kvm_type = {n for n, io in abi.IOCTLS.items() if (io.number >> 8) & 0xFF == 0xAE}
    assert kvm_type <= judged and not ({"APM_IOC_STANDBY", "APM_IOC_SUSPEND"} & judged)
