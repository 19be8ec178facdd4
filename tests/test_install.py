"""The generator from a wheel: `pip install 'kvm-bindings[codegen]'` works outside any checkout.

The wheel is built from a copy of this checkout and installed into fresh venvs; every
command runs from a folder outside the checkout. What the generated module says is
compared with gcc compiling against the same /usr/include, so the oracle is not us.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REQUIRE_TOOLS, ROOT, need

TIMEOUT = 300
SHIPPED = json.loads((ROOT / "headers" / "manifest.json").read_text())["shipped"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _copy_source(dest: Path) -> None:
    """What a clean clone holds for a build: no venv, caches, build output or fetched headers."""
    skip = {".git", ".venv", ".tox", "build", "dist", "__pycache__", ".hypothesis", ".mypy_cache",
            ".pytest_cache", ".ruff_cache", "tests", "bench"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        out = {n for n in names if n in skip or n.endswith(".egg-info")}
        if Path(folder).resolve() == (ROOT / "headers").resolve():
            out |= {n for n in names if (Path(folder) / n).is_dir()}   # headers/<version>/
        return out
    shutil.copytree(ROOT, dest, ignore=ignore)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    # Building needs setuptools and the extra needs pycparser and jinja2, all from PyPI.
    probe = _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
                  "-d", tmp / "probe", "pycparser>=2.21"], cwd=tmp)
    need(probe.returncode == 0, f"PyPI is not reachable: {probe.stderr.strip()[-300:]}", REQUIRE_TOOLS)
    _copy_source(tmp / "src")
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
                 "-w", tmp / "dist", tmp / "src"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    (built,) = (tmp / "dist").glob("kvm_bindings-*.whl")
    return built


def _venv(tmp: Path, requirement: str) -> Path:
    proc = _run([sys.executable, "-m", "venv", tmp / "venv"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    python = tmp / "venv" / "bin" / "python"
    proc = _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement],
                cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return python


@pytest.fixture(scope="module")
def plain_venv(wheel, tmp_path_factory) -> Path:
    """kvm-bindings alone: the runtime, no generator dependencies."""
    return _venv(tmp_path_factory.mktemp("plain"), str(wheel))


@pytest.fixture(scope="module")
def codegen_venv(wheel, tmp_path_factory) -> Path:
    return _venv(tmp_path_factory.mktemp("codegen"), f"kvm-bindings[codegen] @ {wheel.as_uri()}")


@pytest.fixture
def elsewhere(tmp_path) -> tuple[Path, dict[str, str]]:
    """A working folder outside the checkout, and an environment that points nowhere into it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "KVM_BINDINGS_HEADERS", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path / "home")
    work = tmp_path / "work"
    work.mkdir()
    return work, env


def _script(python: Path) -> Path:
    return python.parent / "kvm-codegen"


def _site_packages(python: Path) -> Path:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def test_without_the_extra_the_runtime_imports_and_the_generator_names_the_extra(plain_venv, elsewhere):
    work, env = elsewhere
    code = ("import sys, kvm_bindings, kvm_bindings.abi, kvm_bindings.x86\n"
            "assert kvm_bindings.abi.KVM_RUN == 0xae80\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'codegen'], 'runtime imported codegen'")
    proc = _run([plain_venv, "-c", code], cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    for cmd in ([_script(plain_venv)], [plain_venv, "-m", "codegen"]):
        proc = _run([*cmd, "generate", "--include-dir", "/usr/include", "--arch", "x86_64",
                     "--out", work / "out"], cwd=work, env=env)
        assert proc.returncode == 1
        assert "pip install 'kvm-bindings[codegen]'" in proc.stderr
        assert "pycparser" in proc.stderr and "jinja2" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (work / "out").exists()


def test_console_script_and_python_m_both_run(codegen_venv, elsewhere):
    work, env = elsewhere
    for cmd, prog in (([_script(codegen_venv)], "kvm-codegen"), ([codegen_venv, "-m", "codegen"],
                                                                 "python -m codegen")):
        proc = _run([*cmd, "--help"], cwd=work, env=env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"usage: {prog} ")
        assert "fetch-headers" in proc.stdout and "generate" in proc.stdout


def test_manifest_and_templates_come_from_site_packages(codegen_venv, elsewhere):
    work, env = elsewhere
    code = ("import json, codegen, codegen.headers as h\n"
            "from pathlib import Path\n"
            "templates = Path(codegen.__file__).parent / 'templates'\n"
            "print(json.dumps({'package': codegen.__file__, 'checkout': h.CHECKOUT and str(h.CHECKOUT),"
            " 'manifest': str(h.MANIFEST), 'shipped': h.shipped_version(),"
            " 'templates': sorted(p.name for p in templates.iterdir())}))")
    proc = _run([codegen_venv, "-c", code], cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    site = _site_packages(codegen_venv)
    assert Path(found["package"]) == site / "codegen" / "__init__.py"
    assert found["checkout"] is None
    assert Path(found["manifest"]) == site / "codegen" / "pinned" / "manifest.json"
    # the one manifest: what the checkout's headers/manifest.json says, byte for byte
    assert Path(found["manifest"]).read_bytes() == (ROOT / "headers" / "manifest.json").read_bytes()
    assert found["shipped"] == SHIPPED
    assert found["templates"] == sorted(p.name for p in (ROOT / "codegen" / "templates").glob("*.j2"))
    assert not (site / "codegen" / "pinned" / SHIPPED).exists()   # never the fetched headers


def test_fetched_headers_go_to_the_user_cache_or_where_the_environment_says(codegen_venv, elsewhere):
    work, env = elsewhere
    code = "import codegen.headers as h; print(h.HEADERS_DIR)"
    where = {}
    for name, extra in (("home", {}), ("xdg", {"XDG_CACHE_HOME": str(work / "xdg")}),
                        ("relative xdg", {"XDG_CACHE_HOME": "relative/cache"}),
                        ("override", {"XDG_CACHE_HOME": str(work / "xdg"),
                                      "KVM_BINDINGS_HEADERS": str(work / "mine")})):
        proc = _run([codegen_venv, "-c", code], cwd=work, env={**env, **extra})
        assert proc.returncode == 0, proc.stderr
        where[name] = Path(proc.stdout.strip())
    assert where == {"home": Path(env["HOME"]) / ".cache" / "kvm-bindings" / "headers",
                     "xdg": work / "xdg" / "kvm-bindings" / "headers",
                     "relative xdg": Path(env["HOME"]) / ".cache" / "kvm-bindings" / "headers",
                     "override": work / "mine"}


def test_a_version_in_the_user_cache_is_used_for_generate(codegen_venv, elsewhere):
    """fetch-headers verifies what is in the cache against the packaged manifest; generate uses it."""
    work, env = elsewhere
    fetched = ROOT / "headers" / SHIPPED
    need((fetched / "SOURCE.json").exists(), f"headers/{SHIPPED} is not fetched (run "
         f"`python -m codegen fetch-headers`)", REQUIRE_TOOLS)
    cache = Path(env["HOME"]) / ".cache" / "kvm-bindings" / "headers"
    shutil.copytree(fetched, cache / SHIPPED)
    proc = _run([_script(codegen_venv), "fetch-headers", SHIPPED], cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "already fetched and verified" in proc.stdout
    proc = _run([_script(codegen_venv), "generate", "--version", SHIPPED, "--arch", "x86_64", "--no-facts",
                 "--out", work / "out"], cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"Linux {SHIPPED} uapi headers" in (work / "out" / "x86_64.py").read_text()


ORACLE = r"""
#include <stddef.h>
#include <stdio.h>
#include <linux/kvm.h>
int main(void) {
    printf("{\"KVM_API_VERSION\": %d, \"KVM_RUN\": %lu, \"KVM_GET_REGS\": %lu, "
           "\"sizeof kvm_regs\": %zu, \"sizeof kvm_sregs\": %zu, \"sizeof kvm_run\": %zu, "
           "\"offsetof kvm_run.exit_reason\": %zu}\n",
           KVM_API_VERSION, (unsigned long)KVM_RUN, (unsigned long)KVM_GET_REGS,
           sizeof(struct kvm_regs), sizeof(struct kvm_sregs), sizeof(struct kvm_run),
           offsetof(struct kvm_run, exit_reason));
    return 0;
}
"""

GENERATED = r"""
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
from mykvm import x86_64 as m
print(json.dumps({"KVM_API_VERSION": m.KVM_API_VERSION, "KVM_RUN": m.KVM_RUN,
                  "KVM_GET_REGS": m.KVM_GET_REGS, "sizeof kvm_regs": ctypes.sizeof(m.kvm_regs),
                  "sizeof kvm_sregs": ctypes.sizeof(m.kvm_sregs),
                  "sizeof kvm_run": ctypes.sizeof(m.kvm_run),
                  "offsetof kvm_run.exit_reason": m.kvm_run.exit_reason.offset}))
"""


def test_installed_generator_regenerates_from_usr_include_as_gcc_sees_it(codegen_venv, elsewhere, gcc):
    work, env = elsewhere
    need(platform.machine() == "x86_64", "the gcc oracle runs x86_64 code: not an x86_64 host", False)
    need(Path("/usr/include/linux/kvm.h").exists(), "no /usr/include/linux/kvm.h (Debian: linux-libc-dev)",
         REQUIRE_TOOLS)
    proc = _run([_script(codegen_venv), "generate", "--include-dir", "/usr/include", "--arch", "x86_64",
                 "--out", work / "out" / "mykvm"], cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (work / "out" / "mykvm" / "x86_64.py").exists()

    (work / "oracle.c").write_text(ORACLE)
    proc = _run([gcc, "-o", work / "oracle", work / "oracle.c"], cwd=work)
    assert proc.returncode == 0, proc.stderr
    expected = json.loads(_run([work / "oracle"], cwd=work).stdout)
    proc = _run([codegen_venv, "-c", GENERATED, work / "out"], cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected
    assert expected["KVM_API_VERSION"] == 12 and expected["sizeof kvm_regs"] == 144


def test_checkout_only_commands_say_so_and_write_nothing(codegen_venv, elsewhere):
    work, env = elsewhere
    abi = _site_packages(codegen_venv) / "kvm_bindings" / "abi"
    before = {p.name: p.stat().st_mtime_ns for p in abi.iterdir()}
    for args, words in ((["generate", "--include-dir", "/usr/include", "--arch", "x86_64"], "--out DIR"),
                        (["check"], "compares the checkout's kvm_bindings/abi/"),
                        (["pin", "9.9.9", "--pypi", "ziglang==0.17.0"], "headers/manifest.json")):
        proc = _run([_script(codegen_venv), *args], cwd=work, env=env)
        assert proc.returncode == 1, args
        assert "only in a checkout" in proc.stderr and words in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in abi.iterdir()} == before
