"""Fetch pinned kernel uapi headers, verifying each archive and every header.

Sources are registry artifacts pinned by file name and sha256: a PyPI wheel of
ziglang (installed uapi headers of one kernel release, every arch), or Debian's
linux-libc-dev-<arch>-cross packages (one per arch). The manifest also pins the
sha256 of every header the KVM headers pull in, so a fetch either reproduces
exactly the pinned tree or fails.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .arches import ARCHES, Arch, get_arch
from .errors import GeneratorError
from .headers import (
    HEADERS_DIR,
    KVM_HEADER,
    MANIFEST,
    STAMP,
    MissingInclude,
    closure,
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
# the arch-neutral folders taken into common/ (video/ for x86's asm/bootparam.h)
COMMON_SUBDIRS = ("linux", "asm-generic", "video")


class Unfetchable(GeneratorError):
    """The registry did not hand over a pinned archive."""


def _pip_download(package: str, version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--platform", WHEEL_PLATFORM, "--disable-pip-version-check", "-q",
           "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unfetchable(f"could not download {package}=={version} from PyPI: {last}")
    return wheels[0]


def _apt_download(package: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=dest,
                          capture_output=True, text=True)
    debs = list(dest.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unfetchable(f"could not download {package}={version} with apt-get "
                             f"(run apt-get update first): {last}")
    return debs[0]


def _deb_data(deb: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an ar archive), opened."""
    data = deb.read_bytes()
    if data[:8] != b"!<arch>\n":
        raise GeneratorError(f"{deb.name} is not a Debian package")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(data[pos + 60:pos + 60 + size]), mode="r:*")
        pos += 60 + size + (size & 1)
    raise GeneratorError(f"{deb.name} has no data.tar member")


def _extract_deb(deb: Path, dest: Path, with_common: bool, seen: set[str] | None = None) -> str:
    """Unpack usr/<triplet>/include from a linux-libc-dev-*-cross package; return its arch.

    seen, if given, collects every usr/<triplet>/include folder the package has.
    """
    triplets = {a.multiarch: a for a in ARCHES.values()}
    arch = None
    with _deb_data(deb) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts    # "./usr/<triplet>/include/..." without the "."
            if len(parts) < 5 or parts[0] != "usr" or parts[2] != "include" or not member.isfile():
                continue
            if seen is not None:
                seen.add(f"usr/{parts[1]}/include")
            found = triplets.get(parts[1])
            if found is None:
                continue
            arch = found
            sub = parts[3]
            if sub == "asm":
                out = dest / arch.header_dir / Path(*parts[3:])
            elif sub in COMMON_SUBDIRS and with_common:
                out = dest / "common" / Path(*parts[3:])
            else:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())   # type: ignore[union-attr]
    if arch is None:
        raise GeneratorError(f"{deb.name} holds no usr/<triplet>/include for a known arch")
    return arch.name


def _download_tree(source: dict, tmp: Path, version: str) -> Path:
    """Download a pinned source, check each archive's name and sha256, unpack the headers."""
    tree = tmp / "tree"
    if source["kind"] == "pypi-wheel":
        archives = [(source, _pip_download(source["package"], source["version"], tmp / "dl"))]
    elif source["kind"] == "debian-packages":
        archives = [(p, _apt_download(p["package"], p["version"], tmp / "dl" / p["package"]))
                    for p in source["packages"]]
    else:
        raise GeneratorError(f"{version}: unknown source kind {source['kind']!r}")
    for i, (pinned, path) in enumerate(archives):
        if path.name != pinned["file"]:
            raise GeneratorError(f"kernel {version}: the registry served {path.name}, the manifest "
                                 f"pins {pinned['file']}")
        digest = sha256_file(path)
        if digest != pinned["sha256"]:
            raise GeneratorError(f"kernel {version}: {path.name} has sha256 {digest}, "
                                 f"the manifest pins {pinned['sha256']}")
        if source["kind"] == "pypi-wheel":
            _extract_tree(path, tree)
        else:
            _extract_deb(path, tree, with_common=i == 0)
    return tree


def zig_arch_dirs(folders: dict[str, bool]) -> dict[str, str]:
    """Which of a ziglang wheel's include folders holds each arch's asm/.

    folders: every folder under lib/libc/include that has an asm/, mapped to whether
    that asm/ has a kvm.h. Zig renamed its folders over time (x86_64-linux-any in 0.8,
    arm64-linux-any in 0.9.0, x86-linux-any and aarch64-linux-any later); each arch lists
    them all in codegen/arches.py, and one that has asm/kvm.h is preferred.
    """
    out = {}
    for arch in ARCHES.values():
        present = [d for d in arch.zig_dirs if d in folders]
        if present:
            out[arch.name] = next((d for d in present if folders[d]), present[0])
    return out


def _zig_folders(z: zipfile.ZipFile) -> dict[str, bool]:
    folders: dict[str, bool] = {}
    for name in z.namelist():
        if not name.startswith(ZIG_INCLUDE):
            continue
        parts = name[len(ZIG_INCLUDE):].split("/")
        if len(parts) >= 3 and parts[1] == "asm" and parts[0] != ZIG_COMMON:
            folders[parts[0]] = folders.get(parts[0], False) or parts[2] == "kvm.h"
    return folders


def _extract_tree(wheel: Path, dest: Path) -> list[str]:
    """Unpack common/ and each arch's asm/ from a ziglang wheel into dest.

    Returns the wheel's folders that have an asm/, for messages about a missing arch.
    """
    wanted = {f"{ZIG_COMMON}/{sub}/": f"common/{sub}/" for sub in COMMON_SUBDIRS + ("asm",)}
    with zipfile.ZipFile(wheel) as z:
        folders = _zig_folders(z)
        for arch, zdir in zig_arch_dirs(folders).items():
            wanted[f"{zdir}/asm/"] = f"{ARCHES[arch].header_dir}/asm/"
        for name in z.namelist():
            if not name.startswith(ZIG_INCLUDE) or name.endswith("/"):
                continue
            rel = name[len(ZIG_INCLUDE):]
            for src, dst in wanted.items():
                if rel.startswith(src):
                    out = dest / (dst + rel[len(src):])
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(name))
    return sorted(folders)


def _closure(tree: Path, arch_dir: str, tops: tuple[str, ...]) -> set[str]:
    """Every header file `tops` include for one arch, relative to the tree."""
    paths = closure([tree / arch_dir, tree / "common"], tops)
    return {str(p.resolve().relative_to(tree.resolve())) for p in paths}


def _source_name(source: dict) -> str:
    if source["kind"] == "pypi-wheel":
        return f"PyPI {source['package']}=={source['version']}"
    return "Debian " + ", ".join(f"{p['package']}={p['version']}" for p in source["packages"])


def _pin_files(tree: Path, wanted: list[Arch], source: dict) -> tuple[set[str], dict[str, dict[str, str]]]:
    """The files to pin for each arch, and {arch: {extra header: why}} for those left out.

    linux/kvm.h (with linux/version.h) must be complete; an arch's extra header the
    source lacks, or one that includes a header the source lacks, is left out with why.
    """
    files: set[str] = set()
    left_out: dict[str, dict[str, str]] = {}
    for arch in wanted:
        try:
            files |= _closure(tree, arch.header_dir, (KVM_HEADER, "linux/version.h"))
        except MissingInclude as e:
            raise GeneratorError(f"the KVM headers for {arch.name} are incomplete: {e.message}") \
                from None
        for header in arch.extra_headers:
            try:
                files |= _closure(tree, arch.header_dir, (header,))
            except MissingInclude as e:
                left_out.setdefault(arch.name, {})[header] = \
                    f"{_source_name(source)}: {e.message}"
    return files, left_out


def pin(version: str, pypi: str | None = None, debian: list[str] | None = None,
        arches: list[str] | None = None, force: bool = False) -> dict:
    """Download a source once and write its manifest entry (a maintainer's step).

    pypi: "ziglang==X.Y.Z"; debian: ["linux-libc-dev-amd64-cross=6.1.4-1cross1", ...],
    the first of which also provides linux/ and asm-generic/. arches: the arches to pin
    (default: every arch that has KVM in that kernel); the source must have each one's
    asm/kvm.h. An existing pin is replaced only with force.
    """
    manifest = load_manifest(MANIFEST)
    if version in manifest["versions"] and not force:
        old = describe_source(manifest["versions"][version]["source"])
        raise GeneratorError(f"kernel {version} is already pinned to {old}; pass --force to "
                             f"replace its pin")
    if arches:
        names = {get_arch(a).name for a in arches}
        wanted = [a for a in ARCHES.values() if a.name in names]
    else:
        wanted = [a for a in ARCHES.values() if a.has_kvm(version)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tree = tmp / "tree"
        if pypi:
            package, _, pkg_version = pypi.partition("==")
            wheel = _pip_download(package, pkg_version, tmp / "dl")
            folders = _extract_tree(wheel, tree)
            source: dict = {"kind": "pypi-wheel", "package": package, "version": pkg_version,
                            "file": wheel.name, "sha256": sha256_file(wheel)}

            def looked(arch: Arch) -> str:
                return "/, ".join(f"lib/libc/include/{d}" for d in arch.zig_dirs) + "/"
        elif debian:
            packages = []
            seen: set[str] = set()
            for i, spec in enumerate(debian):
                package, _, pkg_version = spec.partition("=")
                deb = _apt_download(package, pkg_version, tmp / "dl" / package)
                _extract_deb(deb, tree, with_common=i == 0, seen=seen)
                packages.append({"package": package, "version": pkg_version, "file": deb.name,
                                 "sha256": sha256_file(deb)})
            source = {"kind": "debian-packages", "packages": packages}
            folders = sorted(seen)

            def looked(arch: Arch) -> str:
                return f"usr/{arch.multiarch}/include/"
        else:
            raise GeneratorError("pin needs --pypi or --debian")
        declared = read_version((tree / "common",))
        if declared != version:
            raise GeneratorError(f"that source carries kernel {declared} headers, not {version}")
        missing = [a for a in wanted if not (tree / a.header_dir / "asm" / "kvm.h").exists()]
        if missing:
            raise GeneratorError(
                f"{describe_source(source)} has no asm/kvm.h for "
                f"{', '.join(a.name for a in missing)} (looked in "
                f"{'; '.join(f'{a.name}: {looked(a)}' for a in missing)}); the folders it has: "
                f"{', '.join(folders) or 'none'}. Pin another source, or only the arches it "
                f"has with --arch")
        files, left_out = _pin_files(tree, wanted, source)
        entry = {"source": source, "arches": [a.name for a in wanted],
                 "files": {f: sha256_file(tree / f) for f in sorted(files)}}
        if left_out:
            entry["left_out"] = left_out
    manifest = load_manifest(MANIFEST)
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
    HEADERS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=HEADERS_DIR, prefix=".fetch-") as tmp:
        try:
            tree = _download_tree(source, Path(tmp), version)
        except Unfetchable as e:
            raise GeneratorError(
                f"kernel {version}: its pinned source {describe_source(source)} cannot be fetched "
                f"({e.message}). If the registry no longer serves it, pin another source with "
                f"`python -m codegen pin {version} --pypi PACKAGE==VERSION` (or --debian "
                f"PACKAGE=VERSION ...)") from None
        staged = Path(tmp) / "staged"
        for rel in entry["files"]:
            if not (tree / rel).exists():
                raise GeneratorError(f"kernel {version}: the source lacks pinned header {rel}")
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
    log(f"{version}: fetched {len(entry['files'])} headers from {describe_source(source)}, "
        f"all sha256 verified")
    return folder


def _verify(folder: Path, files: dict[str, str]) -> list[str]:
    return [rel for rel, digest in files.items()
            if not (folder / rel).exists() or sha256_file(folder / rel) != digest]
