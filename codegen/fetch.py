"""Fetch pinned kernel uapi headers, verifying the archive and every header.

Sources are immutable registry artifacts: a PyPI wheel of ziglang carries the
installed uapi headers of one kernel release. The manifest pins the file name
and sha256 of the wheel and the sha256 of every header the KVM headers pull in,
so a fetch either reproduces exactly the pinned tree or fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .arches import ARCHES
from .errors import GeneratorError
from .headers import (
    HEADERS_DIR,
    MANIFEST,
    STAMP,
    describe_source,
    load_manifest,
    read_version,
    sha256_file,
    version_dir,
    version_key,
)

WHEEL_PLATFORM = "manylinux_2_12_x86_64"  # headers are the same in every platform's wheel
ZIG_INCLUDE = "ziglang/lib/libc/include/"
ZIG_COMMON = "any-linux-any"
ZIG_ARCH_DIRS = {"x86_64": "x86-linux-any", "arm64": "aarch64-linux-any",
                 "riscv64": "riscv-linux-any"}


def _pip_download(package: str, version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--platform", WHEEL_PLATFORM, "--disable-pip-version-check", "-q",
           "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise GeneratorError(f"could not download {package}=={version} from PyPI: {last}")
    return wheels[0]


def _extract_tree(wheel: Path, dest: Path) -> None:
    """Unpack common/ and each arch's asm/ from a ziglang wheel into dest."""
    wanted = {f"{ZIG_COMMON}/{sub}/": f"common/{sub}/" for sub in ("linux", "asm-generic", "asm")}
    for arch, zdir in ZIG_ARCH_DIRS.items():
        wanted[f"{zdir}/asm/"] = f"{ARCHES[arch].header_dir}/asm/"
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if not name.startswith(ZIG_INCLUDE) or name.endswith("/"):
                continue
            rel = name[len(ZIG_INCLUDE):]
            for src, dst in wanted.items():
                if rel.startswith(src):
                    out = dest / (dst + rel[len(src):])
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(name))


def _closure(tree: Path, arch_dir: str) -> set[str]:
    """Every header file linux/kvm.h (and linux/version.h) includes for one arch."""
    src = "#include <linux/kvm.h>\n#include <linux/version.h>\n"
    dirs = [tree / arch_dir, tree / "common"]
    cmd = ["gcc", "-M", "-nostdinc", "-x", "c", "-"] + [f"-I{d}" for d in dirs]
    proc = subprocess.run(cmd, input=src, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GeneratorError(f"gcc could not follow the includes for {arch_dir}: "
                             f"{proc.stderr.strip()}")
    out = set()
    for tok in proc.stdout.replace("\\\n", " ").split()[1:]:
        p = Path(tok).resolve()
        out.add(str(p.relative_to(tree.resolve())))
    return out


def pin(version: str, pypi: str) -> dict:
    """Download a source once and write its manifest entry (a maintainer's step)."""
    package, _, pkg_version = pypi.partition("==")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(package, pkg_version, Path(tmp) / "dl")
        tree = Path(tmp) / "tree"
        _extract_tree(wheel, tree)
        declared = read_version((tree / "common",))
        if declared != version:
            raise GeneratorError(f"{pypi} carries kernel {declared} headers, not {version}")
        files: set[str] = set()
        arches = []
        for arch in ARCHES.values():
            if (tree / arch.header_dir / "asm" / "kvm.h").exists():
                arches.append(arch.name)
                files |= _closure(tree, arch.header_dir)
        entry = {
            "source": {"kind": "pypi-wheel", "package": package, "version": pkg_version,
                       "file": wheel.name, "sha256": sha256_file(wheel)},
            "arches": arches,
            "files": {f: sha256_file(tree / f) for f in sorted(files)},
        }
    manifest = load_manifest()
    manifest["versions"][version] = entry
    manifest["versions"] = dict(sorted(manifest["versions"].items(), key=lambda kv: version_key(kv[0])))
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    return entry


def fetch(version: str, log=print) -> Path:
    """Fetch one pinned version into headers/<version>/, or fail naming what to do."""
    manifest = load_manifest()
    entry = manifest["versions"].get(version)
    if entry is None:
        raise GeneratorError(f"kernel version {version!r} is not pinned in headers/manifest.json; "
                             f"pinned: {', '.join(manifest['versions'])}")
    source = entry["source"]
    folder = version_dir(version)
    stamp = folder / STAMP
    if stamp.exists() and json.loads(stamp.read_text()).get("source") == source \
            and _verify(folder, entry["files"]) == []:
        log(f"{version}: already fetched and verified ({len(entry['files'])} headers)")
        return folder
    if source["kind"] != "pypi-wheel":
        raise GeneratorError(f"{version}: unknown source kind {source['kind']!r}")
    HEADERS_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=HEADERS_DIR, prefix=".fetch-") as tmp:
        try:
            wheel = _pip_download(source["package"], source["version"], Path(tmp) / "dl")
        except GeneratorError as e:
            raise GeneratorError(
                f"kernel {version}: its pinned source {describe_source(source)} cannot be fetched "
                f"({e.message}). If the registry no longer serves it, pin another immutable "
                f"source with `python -m codegen pin {version} --pypi PACKAGE==VERSION`.") from None
        if wheel.name != source["file"]:
            raise GeneratorError(f"kernel {version}: PyPI served {wheel.name}, the manifest pins "
                                 f"{source['file']}")
        digest = sha256_file(wheel)
        if digest != source["sha256"]:
            raise GeneratorError(f"kernel {version}: {wheel.name} has sha256 {digest}, "
                                 f"the manifest pins {source['sha256']}")
        tree = Path(tmp) / "tree"
        _extract_tree(wheel, tree)
        staged = Path(tmp) / "staged"
        for rel in entry["files"]:
            if not (tree / rel).exists():
                raise GeneratorError(f"kernel {version}: {wheel.name} lacks pinned header {rel}")
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tree / rel, staged / rel)
        bad = _verify(staged, entry["files"])
        if bad:
            raise GeneratorError(f"kernel {version}: headers differ from their pinned sha256: "
                                 + ", ".join(bad))
        (staged / STAMP).write_text(json.dumps({"version": version, "source": source}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)
    log(f"{version}: fetched {len(entry['files'])} headers from {source['package']}=="
        f"{source['version']}, all sha256 verified")
    return folder


def _verify(folder: Path, files: dict[str, str]) -> list[str]:
    return [rel for rel, digest in files.items()
            if not (folder / rel).exists() or sha256_file(folder / rel) != digest]
