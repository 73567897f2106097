"""One writer per folder: an exclusive advisory lock (`.lock`, holding the owner's process id).

The lock is an OS file lock (`fcntl.flock`), so it dies with its process: a lock file left behind by a killed
run is not held by anyone and the next run simply takes it over. A second process asking for a held lock is
refused at once with a `LockedError` that names the folder and the holder's process id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from xmodal.errors import XmodalError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"

try:  # POSIX; elsewhere locking is skipped with a debug message
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class LockedError(XmodalError, RuntimeError):
    """Another live process holds the folder's lock."""

    def __init__(self, message: str, holder: str | None = None):
        super().__init__(message)
        self.holder = holder

    def __reduce__(self):  # crosses process boundaries (worker pools, spawned ranks) with its holder intact
        return type(self), (str(self), self.holder)


class FolderLock:
    """Exclusive lock on `folder` (created if missing) for the lifetime of this object or a `with` block.

    `what` says what the folder is ("run folder", "teacher cache", ...) for the error message.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "folder", *, name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:  # pragma: no cover
            log.debug("no fcntl on this platform: %s is not locked", self.folder)
            self._fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise LockedError(
                f"{self.what} {self.folder} is in use by {who} ({self.path}); wait for it to finish, stop it, "
                "or choose another folder",
                holder,
            ) from None
        previous = _read_holder(fd)
        if previous and previous != _me():
            log.info("%s %s: taking over the lock left by %s, which is no longer running", self.what,
                     self.folder, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{_me()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.release()


@contextlib.contextmanager
def locked(folder: str | os.PathLike, what: str = "folder") -> Iterator[FolderLock]:
    """`with locked(path, "teacher cache"):` hold the folder's lock for the block."""
    lock = FolderLock(folder, what).acquire()
    try:
        yield lock
    finally:
        lock.release()


def _me() -> str:
    return f"{os.getpid()} on {socket.gethostname()}"


def _read_holder(fd: int) -> str | None:
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return text or None
