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
import subprocess
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
KVM_HEADER = "linux/kvm.h"


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
    # the headers the bindings are made from: linux/kvm.h, then the arch's extra headers
    tops: tuple[str, ...] = (KVM_HEADER,)
    # (header, why) for each of the arch's extra headers these headers cannot provide
    left_out: tuple[tuple[str, str], ...] = ()

    @property
    def includes(self) -> str:
        """C source that includes every top header, one line each."""
        return "".join(f"#include <{h}>\n" for h in self.tops)

    def relpath(self, path: str) -> str:
        """A header path relative to its include dir, for provenance and messages."""
        p = Path(path)
        for d in self.include_dirs:
            try:
                return str(p.resolve().relative_to(d.resolve()))
            except ValueError:
                continue
        return path


class MissingInclude(GeneratorError):
    """A header, or one it includes, is not in the include directories."""


def closure(dirs: tuple[Path, ...] | list[Path], tops: tuple[str, ...] | list[str],
            cc: str = "gcc") -> list[Path]:
    """Every header file that including `tops` reads, as gcc -M finds them."""
    src = "".join(f"#include <{h}>\n" for h in tops)
    cmd = [cc, "-M", "-nostdinc", "-x", "c", "-"] + [f"-I{d}" for d in dirs]
    proc = subprocess.run(cmd, input=src, capture_output=True, text=True)
    if proc.returncode != 0:
        m = re.search(r"^(.*?):(\d+):\d+: fatal error: (.*?): No such file or directory",
                      proc.stderr, re.M)
        if m is None:
            raise GeneratorError(f"gcc could not follow the includes of {', '.join(tops)}: "
                                 f"{proc.stderr.strip()}")
        includer, line, missing = m.groups()
        if includer == "<stdin>":
            raise MissingInclude(f"{missing} is missing")
        rel = _relative(Path(includer), dirs)
        raise MissingInclude(f"{missing} is missing ({rel}:{line} includes it)")
    return [Path(tok) for tok in proc.stdout.replace("\\\n", " ").split()[1:]]


def _relative(p: Path, dirs: tuple[Path, ...] | list[Path]) -> str:
    for d in dirs:
        try:
            return str(p.resolve().relative_to(Path(d).resolve()))
        except ValueError:
            continue
    return str(p)


def _with_extras(hs: HeaderSet, arch: Arch, reasons: dict[str, str] | None = None) -> HeaderSet:
    """hs with the arch's extra headers it can provide as tops, the others left out with why."""
    tops, left_out = list(hs.tops), []
    for header in arch.extra_headers:
        try:
            closure(hs.include_dirs, [header], arch.compiler() or "gcc")
        except MissingInclude as e:
            left_out.append((header, (reasons or {}).get(header) or e.message))
            continue
        tops.append(header)
    return HeaderSet(hs.version, hs.include_dirs, hs.source, tuple(tops), tuple(left_out))


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
    return from_version_folder(folder, arch, version, describe_source(entry["source"]),
                               entry.get("left_out", {}).get(arch.name))


def from_version_folder(folder: Path, arch: Arch, version: str | None = None,
                        source: str | None = None,
                        reasons: dict[str, str] | None = None) -> HeaderSet:
    """reasons: why the manifest left out some of the arch's extra headers, to say so again."""
    arch_dir, common = folder / arch.header_dir, folder / "common"
    if not (common / "linux" / "kvm.h").exists():
        raise GeneratorError("no common/linux/kvm.h in this header folder", str(folder))
    if not arch_dir.is_dir():
        raise GeneratorError(f"this header folder has no {arch.header_dir}/ for {arch.name}",
                             str(folder))
    dirs = (arch_dir, common)
    return _with_extras(HeaderSet(version or read_version(dirs), dirs, source or f"folder {folder}"),
                        arch, reasons)


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
        return _with_extras(HeaderSet(read_version(dirs), dirs, f"include directory {path}"), arch)
    if arch.name not in asm:
        found = ", ".join(f"{name} ({d / 'asm'})" for name, d in asm.items()) or "none"
        raise GeneratorError(f"no asm/kvm.h for {arch.name} under this include directory "
                             f"(looked in {path / arch.multiarch / 'asm'}); the arches it has: "
                             f"{found}", str(path))
    dirs = tuple(dict.fromkeys((asm[arch.name], path)))
    return _with_extras(HeaderSet(read_version(dirs), dirs, f"include directory {path}"), arch)


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
