"""Which filesystem holds a path, read from the mount table (``/proc/mounts`` on Linux).

Carve asks this before serving a cluster from a SQLite file: SQLite's locks
are not safe on a network filesystem, so a database there must be PostgreSQL.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

MOUNTS_FILE = Path("/proc/mounts")
# Filesystems whose files other machines reach over the network (FUSE ones: sshfs, s3fs, gcsfuse, juicefs ...).
NETWORK_TYPES = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "9p", "glusterfs", "lustre", "afs", "gpfs", "beegfs", "ocfs2", "gfs2", "fuse"}
)
_ESCAPE = re.compile(r"\\([0-7]{3})")  # the kernel writes a space in a mount point as \040


@dataclass(frozen=True)
class Mount:
    """One line of the mount table."""

    source: str
    point: str
    fstype: str


def parse_mounts(text: str) -> list[Mount]:
    """The mounts of a ``/proc/mounts`` text, in its order (a later mount on the same point hides an earlier one)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            source, point, fstype = (_ESCAPE.sub(lambda m: chr(int(m[1], 8)), f) for f in fields[:3])
            mounts.append(Mount(source, point, fstype))
    return mounts


def mount_of(path: Path, mounts: Sequence[Mount]) -> Optional[Mount]:
    """The mount holding ``path`` (symlinks resolved; the path need not exist yet): the deepest mount point above it."""
    target = os.path.realpath(path)
    best: Optional[Mount] = None
    for mount in mounts:
        point = mount.point.rstrip("/") or "/"
        inside = target == point or target.startswith(point if point == "/" else point + "/")
        if inside and (best is None or len(point) >= len(best.point.rstrip("/") or "/")):
            best = mount
    return best


def filesystem_type(path: Path, mounts: Optional[str] = None) -> Optional[str]:
    """The type of the filesystem holding ``path`` (``ext4``, ``nfs4`` ...), from ``mounts`` (a mount-table text) or
    ``/proc/mounts``; None when there is no mount table to read (not Linux)."""
    if mounts is None:
        try:
            mounts = MOUNTS_FILE.read_text()
        except OSError:
            return None
    found = mount_of(path, parse_mounts(mounts))
    return found.fstype if found else None


def is_network_filesystem(fstype: str) -> bool:
    """True for NFS, SMB, CephFS, 9p, cluster filesystems and FUSE mounts (``fuse.*``; ``fuseblk`` is a local disk)."""
    return fstype in NETWORK_TYPES or fstype.startswith("fuse.")
