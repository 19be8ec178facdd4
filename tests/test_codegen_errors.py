"""Bad input stops the generator with file:line and the offending text, and writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

CASES = {
    "syntax_error": ("struct kvm_bad {\n\tint a;\n\tint b c;\n};\n",
                     "linux/kvm.h:3", "int b c;"),
    "unknown_type": ("struct kvm_bad {\n\tint a;\n\tmy_type_t x;\n};\n",
                     "linux/kvm.h:3", "unknown type name 'my_type_t'"),
    "unsupported_attribute": ("struct kvm_bad {\n\tint a __attribute__((deprecated));\n};\n",
                              "linux/kvm.h:2", "unsupported attribute 'deprecated'"),
    "missing_include": ("#include <linux/types.h>\n#include <linux/no_such_header.h>\n",
                        "linux/kvm.h:2", "linux/no_such_header.h"),
    "unevaluable_array_size": ("struct kvm_bad {\n\tint a[NOT_DEFINED];\n};\n",
                               "linux/kvm.h:2", "NOT_DEFINED"),
    "unbalanced_attribute": ("struct kvm_bad {\n\tint a __attribute__((aligned(8));\n};\n",
                             "linux/kvm.h:2", "__attribute__"),
}


def _generate(include: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "codegen", "generate", "--include-dir", str(include),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_header_stops_with_location_and_text(case, tmp_path, gcc, request):
    text, where, offending = CASES[case]
    (tmp_path / "inc" / "linux").mkdir(parents=True)
    (tmp_path / "inc" / "linux" / "kvm.h").write_text(text)
    if case == "missing_include":   # give it a real linux/types.h so only the second include fails
        (tmp_path / "inc" / "linux" / "types.h").write_text("typedef unsigned int __u32;\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x86_64.py").write_text("previous output\n")

    proc = _generate(tmp_path / "inc", out)

    print(f"\n[{case}] {proc.stderr.strip()}")   # shown with pytest -s: what a user sees
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ")
    assert where in proc.stderr
    assert offending in proc.stderr
    assert "Traceback" not in proc.stderr
    # nothing half-written: the previous output is untouched and nothing was added
    assert sorted(p.name for p in out.iterdir()) == ["x86_64.py"]
    assert (out / "x86_64.py").read_text() == "previous output\n"


def test_unknown_version_names_what_is_pinned():
    proc = subprocess.run([sys.executable, "-m", "codegen", "generate", "--version", "1.0"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "1.0" in proc.stderr and "pinned" in proc.stderr


def test_unfetchable_source_names_version_source_and_remedy(tmp_path, monkeypatch):
    """A version whose pinned wheel the registry no longer serves fails with what to do."""
    from codegen import fetch, headers
    from codegen.errors import GeneratorError

    manifest = headers.load_manifest()
    entry = dict(manifest["versions"][headers.shipped_version()])
    entry["source"] = dict(entry["source"], version="0.0.0-no-such-release")
    manifest["versions"] = {"9.9.9": entry}
    monkeypatch.setattr(headers, "HEADERS_DIR", tmp_path)
    monkeypatch.setattr(fetch, "HEADERS_DIR", tmp_path)
    monkeypatch.setattr(fetch, "load_manifest", lambda: manifest)
    monkeypatch.setattr(fetch, "version_dir", lambda v: tmp_path / v)
    monkeypatch.setattr(fetch, "_pip_download", _refuse)
    with pytest.raises(GeneratorError) as err:
        fetch.fetch("9.9.9")
    message = str(err.value)
    assert "9.9.9" in message and "ziglang==0.0.0-no-such-release" in message
    assert "python -m codegen pin 9.9.9" in message
    assert not (tmp_path / "9.9.9").exists()


def _refuse(package: str, version: str, dest: Path) -> Path:
    from codegen.fetch import Unfetchable
    raise Unfetchable(f"could not download {package}=={version} from PyPI: no such version")
