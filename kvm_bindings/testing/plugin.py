"""The pytest plugin: fixtures kvm, vm and vcpu for tests that run guests on /dev/kvm.

Registered through the pytest11 entry point, so an installed kvm-bindings offers the
fixtures to every pytest run; it does nothing until a test asks for one. Where the KVM
device is missing or unusable, a test using them is skipped with the reason; with
KVM_BINDINGS_REQUIRE_KVM=1 it fails instead (for CI, where a skip would hide a broken
host). KVM_BINDINGS_DEVICE names another device path than /dev/kvm.

A conftest.py fixture of the same name overrides these, as pytest always does; vcpu is
then built on the conftest's vm (which must give a kvm_bindings Vm, else TypeError).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:     # kvm_bindings itself is imported only when a test asks for a fixture
    from ..system import Kvm
    from ..vcpu import Vcpu
    from ..vm import Vm

__all__ = ["DEVICE_ENV", "REQUIRE_ENV", "device_path", "kvm", "kvm_required", "pytest_addoption", "vcpu",
           "vm"]

# The environment variables the fixtures read.
DEVICE_ENV = "KVM_BINDINGS_DEVICE"
REQUIRE_ENV = "KVM_BINDINGS_REQUIRE_KVM"


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """(Runs when pytest loads the plugin, before any test module is imported.)

    pytest rewrites the asserts of every module in a plugin's distribution, which would
    put its helper names into each module of the runtime and the generated ABI, and
    rewrite them on import. Only the kit is test code: rewrite kvm_bindings.testing alone.
    (pytest has no public call for this; where its internals differ, nothing changes.)"""
    hook = getattr(pluginmanager, "rewrite_hook", None)
    marked = getattr(hook, "_must_rewrite", None)
    if hook is not None and isinstance(marked, set) and "kvm_bindings" in marked:
        marked.difference_update({"kvm_bindings", "codegen"})
        hook.mark_rewrite("kvm_bindings.testing")


def device_path() -> str:
    """The KVM device the fixtures open: $KVM_BINDINGS_DEVICE, else /dev/kvm."""
    from ..system import DEFAULT_PATH

    return os.environ.get(DEVICE_ENV) or DEFAULT_PATH


def kvm_required() -> bool:
    """Whether a missing KVM device fails tests instead of skipping them ($KVM_BINDINGS_REQUIRE_KVM=1)."""
    return os.environ.get(REQUIRE_ENV) == "1"


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    """The KVM device (kvm_bindings.Kvm), closed after the test; skip (or fail) where there is none."""
    from .. import Kvm, KvmUnavailable

    path = device_path()
    try:
        opened = Kvm(path)
    except KvmUnavailable as e:
        reason = f"no usable KVM device at {path}: {e}"
        if kvm_required():
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1: a missing KVM device is a failure here)")
        pytest.skip(reason)
    with opened:
        yield opened


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    """A VM with MEMORY_SIZE (2 MiB) of RAM at MEMORY_ADDR (0) and, on x86, the TSS at TSS_ADDR."""
    from ..x86 import X86Vm
    from .guest import MEMORY_ADDR, MEMORY_SIZE, TSS_ADDR

    with kvm.create_vm() as made:
        if isinstance(made, X86Vm):
            made.set_tss_addr(TSS_ADDR)
        made.add_memory(MEMORY_ADDR, MEMORY_SIZE)
        yield made


@pytest.fixture
def vcpu(vm: Vm) -> Vcpu:
    """vCPU 0 of the vm fixture's VM (which closes it): a conftest.py's own vm too."""
    from ..vm import Vm

    if not isinstance(vm, Vm):
        raise TypeError(f"the vcpu fixture makes vCPU 0 of the vm fixture's VM, but vm gave "
                        f"{type(vm).__name__}: a vm fixture of your own must give a kvm_bindings Vm")
    return vm.create_vcpu(0)
