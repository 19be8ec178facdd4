"""Header sets: the manifest's pinned kernel versions, or any include directory.

A fetched version lives in HEADERS_DIR/<version>/ as common/ (linux/, asm-generic/)
plus one folder per arch holding its asm/. A plain include directory such as
/usr/include is used with its Debian multiarch folder for asm/.

Where the manifest and the fetched headers are (the one place that decides):

- in a checkout (this package beside pyproject.toml and headers/manifest.json):
  the manifest is headers/manifest.json and headers are fetched into headers/;
- installed from a wheel: the manifest is package data (codegen/pinned/manifest.json,
  which pyproject.toml maps from headers/manifest.json) and headers are fetched into
  $XDG_CACHE_HOME/kvm-bindings/headers, or ~/.cache/kvm-bindings/headers;
- either way, $KVM_BINDINGS_HEADERS names another folder for the fetched headers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .arches import Arch
from .errors import GeneratorError

ROOT = Path(__file__).resolve().parent.parent
CHECKOUT: Path | None = ROOT if (ROOT / "pyproject.toml").is_file() \
    and (ROOT / "headers" / "manifest.json").is_file() else None
HEADERS_ENV = "KVM_BINDINGS_HEADERS"


def _headers_dir() -> Path:
    if os.environ.get(HEADERS_ENV):
        return Path(os.environ[HEADERS_ENV]).expanduser().resolve()
    if CHECKOUT is not None:
        return CHECKOUT / "headers"
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"   # XDG: absolute only
    return base / "kvm-bindings" / "headers"


MANIFEST = (CHECKOUT / "headers" if CHECKOUT else Path(__file__).resolve().parent / "pinned") \
    / "manifest.json"
HEADERS_DIR = _headers_dir()
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
    asm = _system_asm_dirs(path)
    if not asm:     # no asm/ for any arch: the headers may need none (gcc names what is missing)
        dirs = tuple(d for d in (path / arch.multiarch, path) if d.is_dir())
        return HeaderSet(read_version(dirs), dirs, f"include directory {path}")
    if arch.name not in asm:
        found = ", ".join(f"{name} ({d / 'asm'})" for name, d in asm.items()) or "none"
        raise GeneratorError(f"no asm/kvm.h for {arch.name} under this include directory "
                             f"(looked in {path / arch.multiarch / 'asm'}); the arches it has: "
                             f"{found}", str(path))
    dirs = tuple(dict.fromkeys((asm[arch.name], path)))
    return HeaderSet(read_version(dirs), dirs, f"include directory {path}")


def include_dir_arches(path: Path) -> list[str]:
    """The arches an include directory has an asm/kvm.h for, in ARCHES order."""
    from .arches import ARCHES
    path = path.resolve()
    if (path / "common").is_dir():
        return [a.name for a in ARCHES.values() if (path / a.header_dir / "asm" / "kvm.h").exists()]
    found = _system_asm_dirs(path)
    return [name for name in ARCHES if name in found]


def _system_asm_dirs(path: Path) -> dict[str, Path]:
    """Each arch's folder holding asm/kvm.h in a system include directory.

    Debian puts asm/ in the multiarch folder (/usr/include/x86_64-linux-gnu/asm); other
    distributions, and cross sysroots such as /usr/aarch64-linux-gnu/include, have a bare
    asm/: it belongs to the arch whose triplet the path names, else to this host.
    """
    from .arches import ARCHES, host_arch
    out = {a.name: path / a.multiarch for a in ARCHES.values()
           if (path / a.multiarch / "asm" / "kvm.h").exists()}
    if (path / "asm" / "kvm.h").exists():
        named = [a for a in ARCHES.values() if a.multiarch in path.parts]
        owner = named[0] if named else host_arch()
        if owner is not None:
            out.setdefault(owner.name, path)
    return out


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
