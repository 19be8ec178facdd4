"""Every KVM ioctl has a call, and every call is what its table row says.

The tables (kvm_bindings._calls for the arch-neutral calls, <arch>._calls for each arch's)
are the one list README, `python -m kvm_bindings info` and these tests read. Here:

- every KVMIO ioctl of the x86_64 ABI is issued by some row of the core or x86 table, or is
  in the x86 table's OMITTED with a one-line reason; an omission that a row now issues, or
  that the generated layer no longer has, is stale;
- every row names a method its fd's class has, and ioctls and a capability that arch's
  generated layer has;
- every row matches the method's code, read with ast (see `Uses` for the rule);
- every ioctl that runtime code names as `abi.KVM_*` is issued by some row of its tables.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import kvm_bindings
from kvm_bindings import _calls, abi
from kvm_bindings.__main__ import call_tables
from kvm_bindings._calls import Call
from kvm_bindings.abi import arm64 as abi_arm64
from kvm_bindings.abi import riscv64 as abi_riscv64
from kvm_bindings.abi import x86_64 as abi_x86_64
from kvm_bindings.arm64 import Arm64Kvm, Arm64Vcpu, Arm64Vm
from kvm_bindings.device import Device
from kvm_bindings.riscv64 import Riscv64Kvm, Riscv64Vcpu, Riscv64Vm
from kvm_bindings.system import Kvm
from kvm_bindings.vcpu import Vcpu
from kvm_bindings.vm import Vm
from kvm_bindings.x86 import X86Kvm, X86Vcpu, X86Vm
from kvm_bindings.x86._calls import OMITTED

KVMIO = 0xAE
PENDING = "pending: issue 14"
ABIS = {"x86_64": abi_x86_64, "arm64": abi_arm64, "riscv64": abi_riscv64}
TABLES = call_tables()
CORE_CLASSES: dict[str, type] = {"system": Kvm, "vm": Vm, "vcpu": Vcpu, "device": Device}
ARCH_CLASSES: dict[str, dict[str, type]] = {
    "x86_64": {"system": X86Kvm, "vm": X86Vm, "vcpu": X86Vcpu, "device": Device},
    "arm64": {"system": Arm64Kvm, "vm": Arm64Vm, "vcpu": Arm64Vcpu, "device": Device},
    "riscv64": {"system": Riscv64Kvm, "vm": Riscv64Vm, "vcpu": Riscv64Vcpu, "device": Device},
}
PACKAGE = Path(kvm_bindings.__file__).parent
NOT_RUNTIME = ("abi", "conformance", "testing")      # generated, or checks of the kernel


def kvm_ioctls(ioctls: Mapping[str, Any]) -> set[str]:
    """The ioctls of KVM's own type (KVMIO): what the generated layer adds for KVM."""
    return {name for name, io in ioctls.items() if (io.number >> 8) & 0xFF == KVMIO}


def uncovered(ioctls: Mapping[str, Any], calls: Iterable[Call],
              omitted: Mapping[str, str]) -> list[str]:
    """KVM ioctls no call issues and no omission explains."""
    called = {name for call in calls for name in call.ioctls}
    return sorted(kvm_ioctls(ioctls) - called - set(omitted))


def stale_omissions(ioctls: Mapping[str, Any], calls: Iterable[Call],
                    omitted: Mapping[str, str]) -> list[str]:
    """Omissions that a call now issues, or that the generated layer no longer has."""
    called = {name for call in calls for name in call.ioctls}
    return sorted(name for name in omitted if name in called or name not in kvm_ioctls(ioctls))


# -- what a method's code does, read with ast

@dataclass
class Uses:
    """What a method does, as its source says.

    The rule: the method's own body, plus every helper it calls, followed as far as they go:
    `self._name(...)` / `cls._name(...)` (a private method: every definition of that name
    along the class's MRO), `super().name(...)` (the definitions after the defining class),
    and a bare `name(...)` that is a function of a kvm_bindings module (not abi). Public
    methods reached through `self.x()` or another object are not followed: they are calls
    with rows of their own. A module-level name a followed body reads (`_KVM_RUN`) counts
    for the `abi.KVM_*` its assignment names.

    names: every `abi.X` attribute read; required: every capability passed as
    `abi.Capability.X` to a `.require()` call (also through a helper's parameter);
    unconditional: those required by statements that always run (the body's top level,
    `with` and `try` bodies, and helpers called from there).
    """

    names: set[str] = field(default_factory=set)
    required: set[str] = field(default_factory=set)
    unconditional: set[str] = field(default_factory=set)


def _plain(obj: Any) -> Any:
    """The function behind a property, classmethod, staticmethod or wrapper."""
    if isinstance(obj, property):
        obj = obj.fget
    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__
    return inspect.unwrap(obj)


@functools.cache
def _tree(func: types.FunctionType) -> ast.FunctionDef:
    node = ast.parse(textwrap.dedent(inspect.getsource(func))).body[0]
    assert isinstance(node, ast.FunctionDef)
    return node


@functools.cache
def _module_constants(module_name: str) -> dict[str, frozenset[str]]:
    """{module-level name: the abi.X names its assignment reads} (in if/else blocks too)."""
    tree = ast.parse(inspect.getsource(sys.modules[module_name]))
    out: dict[str, set[str]] = {}

    def visit(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.If, ast.Try)):
                visit(stmt.body + stmt.orelse)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                read = _abi_names(stmt.value)
                for target in targets:
                    for node in ast.walk(target):
                        if isinstance(node, ast.Name):
                            out.setdefault(node.id, set()).update(read)
    visit(tree.body)
    return {k: frozenset(v) for k, v in out.items()}


def _abi_names(node: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(node)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "abi"}


def _capability(node: ast.AST | None, bound: Mapping[str, str | None]) -> str | None:
    """KVM_CAP_X for `abi.Capability.X`, or for a parameter the caller bound to one."""
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "Capability" and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "abi"):
        return f"KVM_CAP_{node.attr}"
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    return None


def _always_run(body: list[ast.stmt]) -> Iterable[ast.stmt]:
    """The statements of body that run whenever it does."""
    for stmt in body:
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            yield from _always_run(stmt.body)
        elif isinstance(stmt, ast.Try):
            yield from _always_run(stmt.body)
        elif not isinstance(stmt, (ast.If, ast.For, ast.While, ast.Match, ast.FunctionDef,
                                   ast.AsyncFunctionDef, ast.ClassDef)):
            yield stmt


def _helpers(call: ast.Call, func: types.FunctionType, cls: type | None,
             owner: type | None) -> list[tuple[types.FunctionType, type | None, type | None, bool]]:
    """The functions a call reaches that the rule follows: (function, class, defining
    class, whether it is a method taking self/cls first)."""
    f = call.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in ("self", "cls"):
        if cls is None or not f.attr.startswith("_") or f.attr.startswith("__"):
            return []
        defined = [(_plain(vars(k)[f.attr]), k) for k in cls.__mro__ if f.attr in vars(k)]
        return [(helper, cls, k, True) for helper, k in defined if inspect.isfunction(helper)]
    if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Call)
            and isinstance(f.value.func, ast.Name) and f.value.func.id == "super"):
        if cls is None or owner is None:
            return []
        after = cls.__mro__[cls.__mro__.index(owner) + 1:]
        for k in after:
            if f.attr in vars(k) and inspect.isfunction(_plain(vars(k)[f.attr])):
                return [(_plain(vars(k)[f.attr]), cls, k, True)]
        return []
    if isinstance(f, ast.Name):
        target = getattr(sys.modules[func.__module__], f.id, None)
        if (inspect.isfunction(target) and target.__module__.startswith("kvm_bindings.")
                and not target.__module__.startswith("kvm_bindings.abi")):
            return [(target, None, None, False)]
    return []


def _bind(helper: types.FunctionType, method: bool, call: ast.Call,
          bound: Mapping[str, str | None]) -> dict[str, str | None]:
    """The helper's parameters that the call gives a capability."""
    params = [a.arg for a in _tree(helper).args.args][1 if method else 0:]
    out = {p: _capability(a, bound) for p, a in zip(params, call.args)}
    out.update({k.arg: _capability(k.value, bound) for k in call.keywords if k.arg})
    return out


def uses(func: types.FunctionType, cls: type | None, owner: type | None = None,
         bound: Mapping[str, str | None] | None = None,
         seen: frozenset[types.FunctionType] = frozenset()) -> Uses:
    """What func does (see Uses), as a method of cls defined in owner (None: a module function)."""
    bound = bound or {}
    out = Uses()
    if func in seen:
        return out
    seen = seen | {func}
    tree = _tree(func)
    out.names |= _abi_names(tree)
    constants = _module_constants(func.__module__)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in constants:
            out.names |= constants[node.id]
    always = {id(n) for stmt in _always_run(tree.body) for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        runs = id(node) in always
        if isinstance(node.func, ast.Attribute) and node.func.attr == "require" and node.args:
            cap = _capability(node.args[0], bound)
            if cap is not None:
                out.required.add(cap)
                if runs:
                    out.unconditional.add(cap)
        for helper, hcls, howner, method in _helpers(node, func, cls, owner):
            inner = uses(helper, hcls, howner, _bind(helper, method, node, bound), seen)
            out.names |= inner.names
            out.required |= inner.required
            if runs:
                out.unconditional |= inner.unconditional
    return out


def method_uses(cls: type, call: Call) -> Uses:
    """What the method a row names does, on cls."""
    owner = next(k for k in cls.__mro__ if call.attribute in vars(k))
    return uses(_plain(vars(owner)[call.attribute]), cls, owner)


def row_problems(call: Call, cls: type, ioctls: Mapping[str, Any]) -> list[str]:
    """How the row and cls's method disagree: an ioctl the method never names, or a
    capability other than the one it requires (None: it requires none unconditionally; a
    capability: the one it requires unconditionally if it does, else one it requires in
    some branch)."""
    found = method_uses(cls, call)
    issued = found.names & set(ioctls)
    problems = [f"{call.method} on {cls.__name__} does not issue {name}"
                for name in call.ioctls if name not in issued]
    if call.capability is None:
        if found.unconditional:
            problems.append(f"{call.method} on {cls.__name__} requires "
                            f"{sorted(found.unconditional)}, the row says none")
    elif call.capability not in (found.unconditional or found.required):
        problems.append(f"{call.method} on {cls.__name__} requires "
                        f"{sorted(found.unconditional or found.required) or 'nothing'}, "
                        f"the row says {call.capability}")
    return problems


# -- the ioctls the runtime names

def runtime_modules() -> dict[str, Path]:
    """Every runtime module of the package: {dotted name: path}."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] not in NOT_RUNTIME:
            out[".".join(("kvm_bindings", *parts))] = path
    return out


def named_ioctls(source: str, ioctls: Iterable[str]) -> set[str]:
    """The ioctls source names as abi.X."""
    return _abi_names(ast.parse(source)) & set(ioctls)


def unlisted(source: str, ioctls: Iterable[str], calls: Iterable[Call]) -> list[str]:
    """Ioctls source names that no call issues."""
    called = {name for call in calls for name in call.ioctls}
    return sorted(named_ioctls(source, ioctls) - called)


def _arch_of(module: str) -> str | None:
    package = module.split(".")[1]
    return next((arch for arch, pkg in {"x86_64": "x86", "arm64": "arm64",
                                        "riscv64": "riscv64"}.items() if pkg == package), None)


ALL_IOCTLS = {name for a in ABIS.values() for name in kvm_ioctls(a.IOCTLS)}


# -- the tests

def test_every_x86_kvm_ioctl_has_a_call_or_a_reason():
    missing = uncovered(abi_x86_64.IOCTLS, [*TABLES["all"], *TABLES["x86_64"]], OMITTED)
    assert not missing, (f"KVM ioctls with no call and no entry in kvm_bindings.x86._calls."
                         f"OMITTED: {missing}; write the call and its row, or say why not")


def test_no_omission_is_stale():
    stale = stale_omissions(abi_x86_64.IOCTLS, [*TABLES["all"], *TABLES["x86_64"]], OMITTED)
    assert not stale, f"OMITTED lists ioctls that are called now, or gone: {stale}"


def test_each_omission_has_a_one_line_reason():
    for name, reason in OMITTED.items():
        assert reason.strip() and "\n" not in reason and len(reason) < 100, name


def test_the_calls_another_change_is_adding_are_marked_pending():
    pending = {name for name, reason in OMITTED.items() if reason == PENDING}
    assert pending == {
        "KVM_X86_GET_MCE_CAP_SUPPORTED", "KVM_X86_SETUP_MCE", "KVM_X86_SET_MCE",
        "KVM_SET_PMU_EVENT_FILTER", "KVM_SET_VAPIC_ADDR", "KVM_TPR_ACCESS_REPORTING",
        "KVM_SET_CPUID", "KVM_XEN_HVM_CONFIG", "KVM_XEN_HVM_GET_ATTR", "KVM_XEN_HVM_SET_ATTR",
        "KVM_XEN_VCPU_GET_ATTR", "KVM_XEN_VCPU_SET_ATTR", "KVM_XEN_HVM_EVTCHN_SEND",
        "KVM_HYPERV_EVENTFD"} - {n for c in TABLES["x86_64"] for n in c.ioctls}


def test_the_check_notices_a_new_ioctl_and_a_stale_omission():
    """The coverage test can fail: fed the x86 layer plus a KVMIO ioctl nobody calls, the
    check names it (and not one of another ioctl type); an omission the layer lost, or that
    a row issues, is stale."""
    from kvm_bindings.abi._support import Ioctl
    calls = [Call("vm", "vm.create_irqchip", ("KVM_CREATE_IRQCHIP",), None)]
    layer = {"KVM_CREATE_IRQCHIP": abi_x86_64.IOCTLS["KVM_CREATE_IRQCHIP"],
             "KVM_S390_KEYOP": abi_x86_64.IOCTLS["KVM_S390_KEYOP"]}
    omitted = {"KVM_S390_KEYOP": "s390 only"}
    assert uncovered(layer, calls, omitted) == [] and stale_omissions(layer, calls, omitted) == []
    grown = dict(layer, KVM_NEW_THING=Ioctl("KVM_NEW_THING", 0xAEFF, "none", 0, None, None),
                 OTHER_TYPE=Ioctl("OTHER_TYPE", 0x41FF, "none", 0, None, None))
    assert uncovered(grown, calls, omitted) == ["KVM_NEW_THING"]
    assert uncovered(dict(abi_x86_64.IOCTLS, **grown), [*TABLES["all"], *TABLES["x86_64"]],
                     OMITTED) == ["KVM_NEW_THING"]
    assert stale_omissions(layer, calls, {**omitted, "KVM_GONE": "why"}) == ["KVM_GONE"]
    assert stale_omissions(layer, calls, {**omitted, "KVM_CREATE_IRQCHIP": "why"}) == \
        ["KVM_CREATE_IRQCHIP"]


def _rows() -> list[tuple[str, Call, type]]:
    """(arch, row, class) for every row and every class it must hold for: a core row on the
    core class and on each arch's, an arch row on its arch's class."""
    out = [(arch, call, classes[call.fd]) for arch, classes in ARCH_CLASSES.items()
           for call in (*TABLES["all"], *TABLES[arch])]
    out += [("all", call, CORE_CLASSES[call.fd]) for call in TABLES["all"]]
    return out


ROWS = _rows()


@pytest.mark.parametrize("arch, call, cls", ROWS,
                         ids=[f"{arch}-{cls.__name__}-{call.method}" for arch, call, cls in ROWS])
def test_each_row_is_what_its_method_does(arch, call, cls):
    attr = inspect.getattr_static(cls, call.attribute, None)
    assert attr is not None and inspect.isfunction(_plain(attr)), \
        f"{cls.__name__} has no method {call.attribute} for the row {call}"
    ioctls = ABIS[arch].IOCTLS if arch != "all" else abi.IOCTLS
    assert not row_problems(call, cls, ioctls)


@pytest.mark.parametrize("arch", ["all", *ARCH_CLASSES])
def test_each_row_is_well_formed(arch):
    """The fd is one of four, the method is called on that fd's object, the ioctls are KVM
    ioctls and the capability a capability of every arch the row is for; one row per method."""
    abis = list(ABIS.values()) if arch == "all" else [ABIS[arch]]
    methods = [c.method for c in TABLES[arch]]
    assert len(methods) == len(set(methods)), "a method listed twice"
    for call in TABLES[arch]:
        obj = _calls.FDS[call.fd]
        assert call.method.startswith((f"{obj}.", obj.capitalize())), call
        for module in abis:
            assert set(call.ioctls) <= kvm_ioctls(module.IOCTLS), (call, module.__name__)
            assert call.capability is None or \
                call.capability.removeprefix("KVM_CAP_") in module.Capability.__members__, call
    if arch != "all":
        assert not set(methods) & {c.method for c in TABLES["all"]}, "an arch repeats a core row"


def test_the_row_check_notices_a_wrong_row():
    """The row test can fail: a wrong capability, a missing require, an ioctl the method
    never issues, and a method that does not exist are each reported."""
    right = Call("vm", "vm.create_irqchip", ("KVM_CREATE_IRQCHIP",), "KVM_CAP_IRQCHIP")
    assert row_problems(right, X86Vm, abi_x86_64.IOCTLS) == []
    assert row_problems(right._replace(capability="KVM_CAP_PIT"), X86Vm, abi_x86_64.IOCTLS)
    assert row_problems(right._replace(capability=None), X86Vm, abi_x86_64.IOCTLS)
    assert row_problems(right._replace(ioctls=("KVM_CREATE_PIT2",)), X86Vm, abi_x86_64.IOCTLS)
    # through helpers: the capability _cpuid() is handed, the ioctl _pit_ioctl() issues
    cpuid = Call("system", "kvm.get_supported_cpuid", ("KVM_GET_SUPPORTED_CPUID",), "KVM_CAP_EXT_CPUID")
    assert row_problems(cpuid, X86Kvm, abi_x86_64.IOCTLS) == []
    assert row_problems(cpuid._replace(capability="KVM_CAP_EXT_EMUL_CPUID"), X86Kvm, abi_x86_64.IOCTLS)
    add = Call("vm", "vm.add_ioeventfd", ("KVM_IOEVENTFD",), "KVM_CAP_IOEVENTFD")
    assert row_problems(add._replace(capability=None), Vm, abi_x86_64.IOCTLS)
    assert inspect.getattr_static(X86Vm, "create_irqchips", None) is None


def test_helpers_are_followed_as_the_rule_says():
    """The cases the rule exists for: a constant read at module level (KVM_RUN), a module
    function (KVM_GET_API_VERSION), super() of an override (KVM_CREATE_VM), a private method
    defined twice along the MRO (KVM_CHECK_EXTENSION), and a require in a branch, which
    counts as required but not unconditional."""
    run = method_uses(X86Vcpu, Call("vcpu", "vcpu.run", (), None))
    assert "KVM_RUN" in run.names
    assert "KVM_GET_API_VERSION" in method_uses(X86Kvm, Call("system", "Kvm()", (), None)).names
    assert "KVM_CREATE_VM" in method_uses(X86Kvm, Call("system", "kvm.create_vm", (), None)).names
    assert "KVM_CHECK_EXTENSION" in method_uses(X86Vm, Call("vm", "vm.check_extension", (), None)).names
    irqfd = method_uses(Vm, Call("vm", "vm.add_irqfd", (), None))
    assert irqfd.unconditional == {"KVM_CAP_IRQFD"}
    assert irqfd.required == {"KVM_CAP_IRQFD", "KVM_CAP_IRQFD_RESAMPLE"}


def test_every_ioctl_the_runtime_names_is_in_a_table():
    """An ioctl named in runtime code (abi.KVM_*) that no row issues is a call nobody listed:
    the core's modules against the core table, an arch package's against core and arch."""
    problems = {}
    for module, path in runtime_modules().items():
        arch = _arch_of(module)
        calls = [*TABLES["all"], *(TABLES[arch] if arch else ())]
        missing = unlisted(path.read_text(), ALL_IOCTLS, calls)
        if missing:
            problems[module] = missing
    assert not problems, f"ioctls the runtime issues that no row of the call tables lists: {problems}"


def test_the_scan_notices_an_unlisted_ioctl_and_sees_the_whole_runtime():
    source = ("from . import abi\n"
              "def f(vm):\n    vm.ioctl(abi.KVM_CREATE_PIT2, None)\n    abi.KVM_MEM_READONLY\n")
    assert unlisted(source, ALL_IOCTLS, TABLES["all"]) == ["KVM_CREATE_PIT2"]
    assert unlisted(source, ALL_IOCTLS, [*TABLES["all"], *TABLES["x86_64"]]) == []
    modules = runtime_modules()
    assert {"kvm_bindings.vm", "kvm_bindings.x86.vcpu", "kvm_bindings.arm64.vcpu",
            "kvm_bindings._fd", "kvm_bindings.x86.snapshot"} <= set(modules)
    assert not any(m.startswith(("kvm_bindings.abi", "kvm_bindings.testing")) for m in modules)


def test_the_host_table_is_the_core_and_the_host_arch():
    from kvm_bindings.__main__ import host_calls
    assert host_calls() == [*TABLES["all"], *TABLES.get(abi.HOST_ARCH or "", ())]


