"""The public surface: what `import kvm_bindings` shows, what each module exports, and
the naming scheme the README promises."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import kvm_bindings

PUBLIC_MODULES = sorted(
    m.name for m in pkgutil.walk_packages(kvm_bindings.__path__, "kvm_bindings.")
    if not any(part.startswith("_") for part in m.name.split("."))
    and not m.name.startswith(("kvm_bindings.abi", "kvm_bindings.guests")))


def test_dir_of_the_package_is_its_public_names_only():
    shown = set(dir(kvm_bindings))
    assert shown == set(kvm_bindings.__all__)
    assert not shown & {"Any", "TYPE_CHECKING", "annotations", "importlib"}


def test_every_exported_name_resolves():
    for name in kvm_bindings.__all__:
        assert getattr(kvm_bindings, name) is not None, name


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_every_public_module_says_what_it_exports(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"
    # Every public class or function defined here is exported (nothing public by accident).
    defined = [n for n, v in vars(module).items()
               if not n.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v))
               and getattr(v, "__module__", None) == name]
    assert set(defined) <= set(module.__all__), \
        f"{name} defines public names it does not export: {set(defined) - set(module.__all__)}"


def test_the_host_classes_are_the_arch_classes():
    from kvm_bindings import abi
    if abi.HOST_ARCH != "x86_64":
        pytest.skip("the x86 classes are the host's only on x86_64")
    from kvm_bindings import system, vcpu, vm, x86
    assert kvm_bindings.Kvm is x86.X86Kvm and issubclass(x86.X86Kvm, system.Kvm)
    assert kvm_bindings.Vm is x86.X86Vm and issubclass(x86.X86Vm, vm.Vm)
    assert kvm_bindings.Vcpu is x86.X86Vcpu and issubclass(x86.X86Vcpu, vcpu.Vcpu)


def _public_methods(cls: type) -> dict[str, object]:
    return {n: v for n, v in inspect.getmembers(cls)
            if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))}


def test_the_arch_neutral_classes_carry_no_x86_calls():
    # An arm64 user must not be offered calls that cannot work there.
    from kvm_bindings import system, vcpu, vm
    x86_only = {"get_regs", "get_sregs", "get_fpu", "get_lapic", "get_msrs", "set_cpuid2",
                "get_xsave", "get_vcpu_events", "inject_nmi", "translate", "get_nested_state",
                "create_irqchip", "create_pit2", "set_tss_addr", "get_clock", "set_msr_filter",
                "get_supported_cpuid", "get_msr_index_list"}
    for cls in (system.Kvm, vm.Vm, vcpu.Vcpu):
        assert not x86_only & set(_public_methods(cls)), cls


NAMING = re.compile(
    r"^(get|set|add|remove|create|open|enable|has|check|inject|harvest|drain|reset|clear|"
    r"mark|move|run|kick|close|require|translate|signal|capabilities|max|recommended|vm_types|"
    r"fileno|from|setup|write|read|load|view|host|region|overlapping|preferred|vcpu_init|"
    r"finalize|core|sysreg|csr|isa|timer|config|fpr|vector|reg|dump|disable|"
    r"encrypt|memory|interrupt|ioctl|init|notify|"
    r"pre_fault|"          # vcpu.pre_fault_memory(): KVM_PRE_FAULT_MEMORY's own verb
    r"save|restore)")      # save_/restore_: snapshots (vm.save_state(), kvm.restore_vm())


def test_method_names_follow_one_scheme():
    from kvm_bindings import device, memory, system, vcpu, vm
    classes = [system.Kvm, vm.Vm, vcpu.Vcpu, device.Device, memory.GuestMemory]
    for mod in ("x86", "arm64", "riscv64"):
        try:
            pkg = importlib.import_module(f"kvm_bindings.{mod}")
        except ImportError:
            continue
        classes += [v for v in vars(pkg).values() if inspect.isclass(v)
                    and issubclass(v, (system.Kvm, vm.Vm, vcpu.Vcpu))]
    odd = [f"{cls.__name__}.{n}" for cls in classes for n, v in _public_methods(cls).items()
           if inspect.isfunction(v) and not NAMING.match(n)]
    assert not odd, f"methods outside the naming scheme: {odd}"
    # The drifted names of old are gone for good.
    gone = {"irqfd", "irqfd_remove", "ioeventfd", "ioeventfd_remove", "dirty_log", "dirty_ring",
            "coalesced_mmio", "stats", "irq_line", "nmi", "smi", "interrupt", "single_step",
            "sync_regs", "mark_dirty", "supported_cpuid", "emulated_cpuid", "msr_index_list",
            "register_coalesced_mmio", "unregister_coalesced_mmio"}
    for cls in classes:
        assert not gone & set(_public_methods(cls)), cls


def test_capability_queries_are_methods_and_properties_are_cheap_reads():
    from kvm_bindings import system, vcpu, vm
    for cls, allowed in ((system.Kvm, {"fd", "closed"}),
                         (vm.Vm, {"fd", "closed", "vcpus"}),
                         (vcpu.Vcpu, {"fd", "closed", "kvm_run", "immediate_exit"})):
        props = {n for n, v in _public_methods(cls).items() if isinstance(v, property)}
        assert props <= allowed, f"{cls.__name__} properties beyond cheap reads: {props - allowed}"
