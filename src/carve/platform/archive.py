"""Safe extraction of an uploaded adapter archive (.tar.gz or .zip).

Only regular files and folders are extracted; absolute paths, '..' parts,
links and device files are refused before anything is written. The adapter
folder is the archive root, or its single top-level folder.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

MAX_FILES = 64


class ArchiveError(ValueError):
    """The archive is unreadable or unsafe; the message names the member at fault."""


def _safe_member(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")) or (path.parts and ":" in path.parts[0]):
        raise ArchiveError(f"archive member {name!r} has an absolute path")
    if ".." in path.parts:
        raise ArchiveError(f"archive member {name!r} contains '..'")
    return path


def extract_adapter_archive(data: bytes, target: Path, max_bytes: int) -> Path:
    """Extract ``data`` into the empty folder ``target``; returns the adapter folder inside it."""
    if data[:2] == b"\x1f\x8b" or _is_tar(data):
        _extract_tar(data, target, max_bytes)
    elif data[:4] == b"PK\x03\x04":
        _extract_zip(data, target, max_bytes)
    else:
        raise ArchiveError("the upload is neither a .tar.gz nor a .zip archive")
    entries = [p for p in target.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return target


def _is_tar(data: bytes) -> bool:
    return len(data) > 262 and data[257:262] == b"ustar"


def _extract_tar(data: bytes, target: Path, max_bytes: int) -> None:
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        members = archive.getmembers()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"unreadable tar archive: {exc}") from None
    _check_count(len(members))
    total = 0
    for member in members:
        path = _safe_member(member.name)
        if member.issym() or member.islnk():
            raise ArchiveError(f"archive member {member.name!r} is a link; links are not accepted")
        if not (member.isfile() or member.isdir()):
            raise ArchiveError(f"archive member {member.name!r} is not a regular file or folder")
        total += member.size
        if total > max_bytes:
            raise ArchiveError(f"the archive unpacks to more than {max_bytes} bytes")
        destination = target.joinpath(*path.parts)
        if member.isdir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        source = archive.extractfile(member)
        assert source is not None  # a regular file always has content
        destination.write_bytes(source.read())


def _extract_zip(data: bytes, target: Path, max_bytes: int) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"unreadable zip archive: {exc}") from None
    _check_count(len(infos))
    total = 0
    for info in infos:
        path = _safe_member(info.filename)
        mode = info.external_attr >> 16
        if mode and (mode & 0o170000) == 0o120000:
            raise ArchiveError(f"archive member {info.filename!r} is a link; links are not accepted")
        total += info.file_size
        if total > max_bytes:
            raise ArchiveError(f"the archive unpacks to more than {max_bytes} bytes")
        destination = target.joinpath(*path.parts)
        if info.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            destination.write_bytes(archive.read(info))
        except (zipfile.BadZipFile, OSError) as exc:
            raise ArchiveError(f"archive member {info.filename!r} is corrupt: {exc}") from None


def _check_count(n: int) -> None:
    if n > MAX_FILES:
        raise ArchiveError(f"the archive has {n} members; an adapter folder has only a few files (limit {MAX_FILES})")
