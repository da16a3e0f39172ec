"""A slow file system for benchmarks: a FUSE passthrough of a directory whose writes share a bandwidth limit.

    apt-get install -y libfuse2 && python3 -m venv /tmp/fusevenv && /tmp/fusevenv/bin/pip install fusepy
    /tmp/fusevenv/bin/python bench/throttle_fs.py BACKING_DIR MOUNT_POINT --mb-per-s 100   # root; foreground
    umount MOUNT_POINT

Every ``write`` sleeps ``bytes / rate`` under one lock, so all writers together get at most ``--mb-per-s``
(what a shared parallel file system gives one job on a busy day); ``fsync`` adds ``--fsync-ms``. Reads,
metadata and everything else pass straight through. It runs in its own venv (fusepy is not a dependency of
the trainer) and imports nothing from the project.
"""

from __future__ import annotations

import argparse
import errno
import os
import threading
import time
from typing import Any


def build(backing: str, rate: float, fsync_s: float) -> Any:
    from fuse import FuseOSError, Operations

    lock = threading.Lock()

    class Throttled(Operations):  # type: ignore[misc]
        def _p(self, path: str) -> str:
            return os.path.join(backing, path.lstrip("/"))

        def __call__(self, op: str, *args: Any) -> Any:
            try:
                return super().__call__(op, *args)
            except OSError as err:
                raise FuseOSError(err.errno or errno.EIO) from err

        def access(self, path: str, mode: int) -> None:
            if not os.access(self._p(path), mode):
                raise FuseOSError(errno.EACCES)

        def chmod(self, path: str, mode: int) -> None:
            os.chmod(self._p(path), mode)

        def chown(self, path: str, uid: int, gid: int) -> None:
            os.chown(self._p(path), uid, gid)

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            st = os.lstat(self._p(path))
            keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
            return {k: getattr(st, k) for k in keys}

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._p(path))]

        def mkdir(self, path: str, mode: int) -> None:
            os.mkdir(self._p(path), mode)

        def rmdir(self, path: str) -> None:
            os.rmdir(self._p(path))

        def unlink(self, path: str) -> None:
            os.unlink(self._p(path))

        def rename(self, old: str, new: str) -> None:
            os.replace(self._p(old), self._p(new))

        def statfs(self, path: str) -> dict[str, Any]:
            st = os.statvfs(self._p(path))
            keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag")
            return {k: getattr(st, k) for k in (*keys, "f_frsize", "f_namemax")}

        def utimens(self, path: str, times: Any = None) -> None:
            os.utime(self._p(path), times)

        def open(self, path: str, flags: int) -> int:
            return os.open(self._p(path), flags)

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            with lock:  # one shared pipe: writers queue for it
                time.sleep(len(data) / rate)
            return os.pwrite(fh, data, offset)

        def truncate(self, path: str, length: int, fh: int | None = None) -> None:
            os.truncate(self._p(path), length)

        def flush(self, path: str, fh: int) -> None:
            return None

        def release(self, path: str, fh: int) -> None:
            os.close(fh)

        def fsync(self, path: str, datasync: int, fh: int) -> None:
            time.sleep(fsync_s)
            os.fsync(fh)

    return Throttled()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backing")
    p.add_argument("mount")
    p.add_argument("--mb-per-s", type=float, default=100.0)
    p.add_argument("--fsync-ms", type=float, default=50.0)
    args = p.parse_args()
    from fuse import FUSE

    ops = build(os.path.abspath(args.backing), args.mb_per_s * 1e6, args.fsync_ms / 1e3)
    FUSE(ops, args.mount, foreground=True, nothreads=False, big_writes=True, max_write=1 << 20)


if __name__ == "__main__":
    main()
