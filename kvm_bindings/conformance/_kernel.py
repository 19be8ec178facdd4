"""Checks of what the kernel says about itself against what the shipped bindings promise:
the API version, the vCPU mmap size, and every capability's answer."""

from __future__ import annotations

import ctypes
import mmap

from .. import abi
from ..system import Kvm
from .report import Report


def run_checks(kvm: Kvm, report: Report) -> None:
    version = kvm.api_version
    report.add("api_version", "api", "pass" if version == abi.KVM_API_VERSION else "fail",
               f"KVM_GET_API_VERSION is {version}; the bindings speak {abi.KVM_API_VERSION}")
    size, run = kvm.get_vcpu_mmap_size(), ctypes.sizeof(abi.kvm_run)
    report.add("vcpu_mmap_size", "api", "pass" if size >= run and size % mmap.PAGESIZE == 0 else "fail",
               f"KVM_GET_VCPU_MMAP_SIZE is {size}: sizeof(struct kvm_run) is {run}, and it must "
               "be whole pages")
    _capabilities(kvm, report)


def _capabilities(kvm: Kvm, report: Report) -> None:
    values: dict[abi.Capability, int] = {}
    for cap in abi.Capability:
        name = f"KVM_CAP_{cap.name}"
        try:
            values[cap] = value = kvm.check_extension(cap)
        except OSError as e:
            report.add(name, "capabilities", "fail", f"KVM_CHECK_EXTENSION failed: {e}")
            continue
        # The answer is 0 (absent), or the capability's own value; never negative.
        report.add(name, "capabilities", "pass" if value >= 0 else "fail",
                   f"{value}" if value else "not offered (0)")
    _related(values, report)


def _related(values: dict[abi.Capability, int], report: Report) -> None:
    """Capabilities whose values api.rst relates to one another."""
    cap = abi.Capability
    nr, most, max_id = values.get(cap.NR_VCPUS, 0), values.get(cap.MAX_VCPUS, 0), \
        values.get(cap.MAX_VCPU_ID, 0)
    if nr and most:
        report.add("NR_VCPUS <= MAX_VCPUS", "capabilities", "pass" if nr <= most else "fail",
                   f"recommended {nr}, maximum {most}")
    if most and max_id:
        report.add("MAX_VCPU_ID >= MAX_VCPUS", "capabilities",
                   "pass" if max_id >= most else "fail", f"max id {max_id}, max vCPUs {most}")
    if not values.get(cap.USER_MEMORY):
        report.add("USER_MEMORY offered", "capabilities", "fail",
                   "KVM_CAP_USER_MEMORY is absent: no way to give a VM memory")
