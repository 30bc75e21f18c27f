"""Is a run directory on a file system every node of a multi-node job sees?

Every node's rank writes into the run directory (rank 0 the checkpoints, every rank its error record),
and a requeued job may restart on other nodes, which must read them. On a cluster ``/tmp``,
``/var/tmp``, ``/dev/shm`` and any tmpfs are node-local; network file systems (NFS, Lustre, GPFS,
BeeGFS, CephFS, ...) are shared; a local disk (ext4, xfs, ...) is shared only if it is exported,
which cannot be seen from here.
"""
from __future__ import annotations

from pathlib import Path

NODE_LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")
NODE_LOCAL_TYPES = ("tmpfs", "ramfs", "devtmpfs")
SHARED_TYPES = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "cifs", "smb3", "glusterfs",
                "fuse.glusterfs", "fuse.sshfs", "panfs", "wekafs", "fuse.juicefs", "9p", "virtiofs")


def mount_type(path: Path, mounts: str | None = None) -> str:
    """The file system type of the mount that holds ``path`` (longest mount point prefix in /proc/mounts)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "unknown"
    best, kind = "", "unknown"
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def check_run_dir(path: Path, nodes: int, mounts: str | None = None) -> str | None:
    """For a job on ``nodes`` > 1: raises ValueError when ``path`` is node-local; returns a warning when
    its file system is a local disk (shared only if exported); None when it is a network file system."""
    if nodes <= 1:
        return None
    path = path.resolve()
    kind = mount_type(path, mounts)
    fix = ("use --runs DIR on a file system every node mounts (e.g. under $HOME or /scratch); "
           "--allow-node-local-runs if this cluster really shares it")
    if any(str(path) == d or str(path).startswith(d + "/") for d in NODE_LOCAL_DIRS) or kind in NODE_LOCAL_TYPES:
        raise ValueError(f"run directory {path} ({kind}) is node-local on a cluster: with --nodes {nodes} the "
                         f"other nodes could not write their records there nor a restart read the checkpoints; {fix}")
    if kind not in SHARED_TYPES:
        return (f"note: run directory {path} is on a {kind} file system; with --nodes {nodes} every node must "
                "mount it (it is shared only if exported, e.g. over NFS)")
    return None
