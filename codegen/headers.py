"""Header sets: the manifest's pinned kernel versions, or any include directory.

A fetched version lives in headers/<version>/ as common/ (linux/, asm-generic/)
plus one folder per arch holding its asm/. A plain include directory such as
/usr/include is used with its Debian multiarch folder for asm/.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .arches import Arch
from .errors import GeneratorError

ROOT = Path(__file__).resolve().parent.parent
HEADERS_DIR = ROOT / "headers"
MANIFEST = HEADERS_DIR / "manifest.json"
STAMP = "SOURCE.json"


def load_manifest(path: Path = MANIFEST) -> dict:
    with open(path) as f:
        return json.load(f)


def manifest_versions() -> list[str]:
    return sorted(load_manifest()["versions"], key=version_key)


def shipped_version() -> str:
    return str(load_manifest()["shipped"])


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class HeaderSet:
    """Where to find one kernel's uapi headers for one arch."""

    version: str
    include_dirs: tuple[Path, ...]
    source: str

    def relpath(self, path: str) -> str:
        """A header path relative to its include dir, for provenance and messages."""
        p = Path(path)
        for d in self.include_dirs:
            try:
                return str(p.resolve().relative_to(d.resolve()))
            except ValueError:
                continue
        return path


def version_dir(version: str) -> Path:
    return HEADERS_DIR / version


def from_manifest(version: str, arch: Arch) -> HeaderSet:
    manifest = load_manifest()
    entry = manifest["versions"].get(version)
    if entry is None:
        known = ", ".join(sorted(manifest["versions"], key=version_key))
        raise GeneratorError(f"kernel version {version!r} is not in headers/manifest.json "
                             f"(pinned: {known})")
    folder = version_dir(version)
    stamp = folder / STAMP
    if not stamp.exists():
        raise GeneratorError(f"headers for {version} are not fetched yet; run "
                             f"`python -m codegen fetch-headers {version}`", str(folder))
    if json.loads(stamp.read_text()).get("source") != entry["source"]:
        raise GeneratorError(f"headers/{version} was fetched from another source than the "
                             f"manifest pins; run `python -m codegen fetch-headers {version}` again")
    if arch.name not in entry["arches"]:
        raise GeneratorError(f"kernel {version} in the manifest has no headers for {arch.name}")
    return from_version_folder(folder, arch, version, describe_source(entry["source"]))


def from_version_folder(folder: Path, arch: Arch, version: str | None = None,
                        source: str | None = None) -> HeaderSet:
    arch_dir, common = folder / arch.header_dir, folder / "common"
    if not (common / "linux" / "kvm.h").exists():
        raise GeneratorError("no common/linux/kvm.h in this header folder", str(folder))
    if not arch_dir.is_dir():
        raise GeneratorError(f"this header folder has no {arch.header_dir}/ for {arch.name}",
                             str(folder))
    dirs = (arch_dir, common)
    return HeaderSet(version or read_version(dirs), dirs, source or f"folder {folder}")


def from_include_dir(path: Path, arch: Arch) -> HeaderSet:
    """Headers from an include directory: a version folder or a system include dir."""
    path = path.resolve()
    if (path / "common").is_dir():
        return from_version_folder(path, arch)
    if not (path / "linux" / "kvm.h").exists():
        raise GeneratorError("no linux/kvm.h under this include directory", str(path))
    dirs = tuple(d for d in (path / arch.multiarch, path) if d.is_dir())
    return HeaderSet(read_version(dirs), dirs, f"include directory {path}")


def read_version(dirs: tuple[Path, ...]) -> str:
    """The kernel version a header tree declares in linux/version.h, if any."""
    for d in dirs:
        vh = d / "linux" / "version.h"
        if vh.exists():
            m = re.search(r"LINUX_VERSION_MAJOR\s+(\d+).*?LINUX_VERSION_PATCHLEVEL\s+(\d+)"
                          r".*?LINUX_VERSION_SUBLEVEL\s+(\d+)", vh.read_text(), re.S)
            if m:
                return ".".join(m.groups())
            m = re.search(r"LINUX_VERSION_CODE\s+(\d+)", vh.read_text())
            if m:
                code = int(m.group(1))
                return f"{code >> 16}.{(code >> 8) & 0xFF}.{code & 0xFF}"
    return "unknown"


def describe_source(source: dict) -> str:
    if source["kind"] == "pypi-wheel":
        return f"PyPI {source['package']}=={source['version']} ({source['file']}, sha256 {source['sha256']})"
    if source["kind"] == "debian-packages":
        return "Debian " + ", ".join(f"{p['package']}={p['version']} (sha256 {p['sha256'][:16]}...)"
                                     for p in source["packages"])
    return json.dumps(source, sort_keys=True)
