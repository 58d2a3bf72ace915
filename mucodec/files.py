"""Opening inputs and committing outputs: one place for the checks every reader and writer needs.

Reading: :func:`open_regular` refuses folders, pipes and devices before they can block a job.

Writing: every file the project writes goes through :func:`open_atomic` (or :func:`write_atomic`), which
trusts no write it did not check. The bytes go to a hidden temporary file beside the target; at the end the
file is flushed and ``fsync``ed, its size is compared with the bytes that were written, the caller's own check
runs (an audio writer reads its header back), and only then is it renamed over the target and the folder
``fsync``ed, so neither a full disk nor a power cut can leave a damaged file under a final name. A full,
read-only or failing disk (ENOSPC, EDQUOT, EROFS, EIO) is a :class:`StorageError`: one sentence naming the
folder and the fix, and a job stops at it. Append-only logs (:func:`append_line`) are checked the same way.

:func:`inject_fault` is the seam tests use to make any write fail after a number of bytes.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
import threading
from pathlib import Path

from .errors import OutputError, StorageError

NAME_MAX = 255  # bytes in one file name on common file systems
TEMPORARY_SUFFIX = ".tmp"
_HASH_BLOCK = 1 << 22

# The errors that mean the storage itself fails: every later write to it would fail the same way.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EIO, getattr(errno, "EDQUOT", -1)}


# ---- reading ------------------------------------------------------------------------------------

def os_reason(e: OSError) -> str:
    """The OS's own words for ``e`` (a user knows "Permission denied"; the errno and repr add nothing)."""
    return e.strerror or str(e)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words a user knows (for "it is a named pipe" and the like)."""
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


class NotRegularFile(OSError):
    """The path is a folder, pipe, device or socket: reading it would fail, never end, or block.

    An OSError so that callers who only care whether a file can be read need a single ``except``.
    """

    def __init__(self, path, mode: int):
        self.kind = file_kind(mode)
        super().__init__(f"{os.fspath(path)} is {self.kind}, not a regular file")
        self.filename = os.fspath(path)


def open_regular(path):
    """Read-only binary file object for ``path`` if it is a regular file; never blocks.

    The stat comes first so a FIFO or device is refused without being opened; O_NONBLOCK and the
    fstat after opening cover a path swapped for one in between. Raises NotRegularFile, or the OS's
    OSError (FileNotFoundError, PermissionError, ...).
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(path, mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    f = open(fd, "rb")
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, mode)
    except BaseException:
        f.close()
        raise
    return f


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


# ---- what a failed write means to a user ---------------------------------------------------------

def is_storage_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS


def storage_sentence(path, e: OSError, folder=None, need: int | None = None) -> str:
    """One sentence for a storage failure of ``path``: what happened, to which folder, and the fix."""
    folder = Path(folder) if folder is not None else Path(path).parent
    if e.errno == errno.ENOSPC or e.errno == getattr(errno, "EDQUOT", -1):
        what = "no space is left" if e.errno == errno.ENOSPC else "the disk quota is used up"
        more = f" ({format_bytes(need)} needed for the rest of this job)" if need else ""
        return (f"Cannot write {path}: {what} on {folder}; free space on {folder}{more}, or choose another "
                f"output folder, and run the same command again.")
    if e.errno == errno.EROFS:
        return (f"Cannot write {path}: {folder} is on a read-only file system; choose another output folder, "
                f"or remount it writable, and run the same command again.")
    return (f"Cannot write {path}: the disk holding {folder} reported an input/output error; check that disk "
            f"(or its network mount) and run the same command again.")


def output_error(path, e: OSError) -> OutputError:
    """The OutputError (a StorageError for a full, read-only or failing disk) for ``e`` writing ``path``."""
    path = Path(path)
    if is_storage_failure(e):
        return StorageError(storage_sentence(path, e), path=path, errno=e.errno)
    if isinstance(e, FileNotFoundError) and not path.parent.is_dir():
        return OutputError(f"Cannot write {path}: {os_reason(e)} (create the folder {path.parent} first).")
    return OutputError(f"Cannot write {path}: {os_reason(e)}.")


def job_storage_error(e: StorageError, folder, need: int | None) -> StorageError:
    """``e`` said of a job's output ``folder``, with the space the rest of the job needs where it is known."""
    if e.path is None or e.errno is None:
        return e
    return StorageError(storage_sentence(e.path, OSError(e.errno, os.strerror(e.errno)), folder, need),
                        path=e.path, errno=e.errno)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


# ---- the seam for fault injection -----------------------------------------------------------------

class _Fault:
    """Make writes fail once ``budget`` more bytes have been written (process-wide, every writer)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.budget = None  # None: no fault armed
        self.errno = errno.ENOSPC
        self.tripped = 0

    def allow(self, n: int) -> tuple[int, OSError | None]:
        """How many of ``n`` bytes may be written, and the error to raise after them (None: all of them)."""
        with self.lock:
            if self.budget is None:
                return n, None
            ok = min(n, self.budget)
            self.budget -= ok
            if ok == n:
                return n, None
            self.tripped += 1
            return ok, OSError(self.errno, os.strerror(self.errno))


_FAULT = _Fault()


@contextlib.contextmanager
def inject_fault(after: int = 0, code: int = errno.ENOSPC):
    """Within the block, every write of the project fails with ``code`` once ``after`` more bytes were
    written (the bytes that fit are written first, as a filling disk does). For tests; yields the fault,
    whose ``tripped`` counts the writes that failed."""
    with _FAULT.lock:
        _FAULT.budget, _FAULT.errno, _FAULT.tripped = int(after), code, 0
    try:
        yield _FAULT
    finally:
        with _FAULT.lock:
            _FAULT.budget = None


def _write_all(fd: int, data) -> int:
    """Write every byte of ``data`` at the descriptor's position, or raise the OSError that stopped it."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n, fault = _FAULT.allow(len(view) - done)
        if n:
            written = os.write(fd, view[done:done + n])
            if written == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += written
            if written < n:
                continue
        if fault is not None:
            raise fault
    return done


# ---- atomic, checked writes ----------------------------------------------------------------------

def temporary_name(name: str) -> str:
    """A hidden, unique name for a temporary file beside ``name``, at most NAME_MAX bytes long."""
    suffix = f".{os.getpid()}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
    while name and len(os.fsencode(f".{name}{suffix}")) > NAME_MAX:
        name = name[:-1]  # shorten by characters, so a multi-byte character is never cut in half
    return f".{name}{suffix}"


class CheckedFile:
    """The binary file object :func:`open_atomic` yields: write, seek, tell and read on a descriptor, with
    every byte accounted for.

    ``deferred``: an OSError of a write is kept (:meth:`raise_deferred`) instead of raised, and the write
    reports 0 bytes. For libraries that call the file from a C callback, where a raised exception would only
    be printed (soundfile's virtual I/O): the library sees a short write and the caller raises afterwards.
    """

    def __init__(self, fd: int, path: Path, target: Path, deferred: bool = False):
        self.fd, self.name, self.target, self.deferred = fd, str(path), target, deferred
        self.pos = self.end = 0
        self.error: OSError | None = None
        self.closed = False

    def write(self, data) -> int:
        if self.closed:  # a late call of a library that outlived the block (a file object's finaliser)
            return self._fail(OSError(errno.EBADF, "write after the file was closed"))
        if self.error is not None:  # the disk failed once: nothing after it can be trusted
            return self._fail(self.error)
        try:
            n = _write_all(self.fd, data)
        except OSError as e:
            return self._fail(e)
        self.pos += n
        self.end = max(self.end, self.pos)
        return n

    def _fail(self, e: OSError) -> int:
        if self.error is None:
            self.error = e
        if self.deferred:
            return 0
        raise output_error(self.target, e) from None

    def raise_deferred(self) -> None:
        if self.error is not None:
            raise output_error(self.target, self.error) from None

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if self.closed:
            return self.pos
        try:
            self.pos = os.lseek(self.fd, offset, whence)
        except OSError as e:  # never raised into a C callback, where it would only be printed
            self._fail(e)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if self.closed:
            return b""
        try:
            data = os.read(self.fd, n if n >= 0 else max(self.end - self.pos, 0))
        except OSError as e:
            self._fail(e)
            return b""
        self.pos += len(data)
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def flush(self) -> None:
        pass  # unbuffered: every write went to the descriptor

    def fileno(self) -> int:
        return self.fd

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True


@contextlib.contextmanager
def open_atomic(path, *, check=None, before_commit=None, deferred: bool = False):
    """A :class:`CheckedFile` whose content replaces ``path`` only when the block succeeds and the file checks.

    After the block: the deferred write error, if any, is raised; the file is ``fsync``ed and its size must
    equal the bytes written; ``check(tmp_path)`` (the caller's own check, e.g. reading a header back) runs;
    ``before_commit(path, {"bytes", "sha256"})`` runs (a job records what the committed file must be); then
    the rename, and an ``fsync`` of the folder. On any failure the temporary file is removed.

    An OSError of the writes or of these steps becomes an OutputError naming ``path`` (a StorageError for a
    full, read-only or failing disk); other exceptions of the caller's block pass through unchanged.
    """
    path = Path(path)
    while True:
        tmp = path.parent / temporary_name(path.name)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise output_error(path, e) from None
    f = CheckedFile(fd, tmp, path, deferred)
    try:
        try:
            yield f
        except BaseException as e:
            if f.error is not None and not isinstance(e, KeyboardInterrupt):
                raise output_error(path, f.error) from None  # the disk failed first: that is the cause
            raise  # the caller's own exception, unchanged
        try:
            f.raise_deferred()
            os.fsync(fd)
            size = os.fstat(fd).st_size
        except OSError as e:
            raise output_error(path, e) from None
        f.closed = True
        os.close(fd)
        if size != f.end:
            raise OutputError(f"Cannot write {path}: {f.end} bytes were written but the file holds {size}; "
                              f"check the disk holding {path.parent} and run the same command again.")
        if check is not None:
            check(tmp)
        if before_commit is not None:
            before_commit(path, {"bytes": size, "sha256": sha256(tmp)})
        try:
            os.replace(tmp, path)
            fsync_folder(path.parent)
        except OSError as e:
            raise output_error(path, e) from None
    finally:
        if not f.closed:
            f.closed = True
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(path, data: bytes, **kwargs) -> None:
    """Write ``data`` to ``path`` through :func:`open_atomic` (OutputError, StorageError)."""
    with open_atomic(path, **kwargs) as f:
        f.write(data)


def fsync_folder(folder) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # file systems that cannot sync a folder
            raise
    finally:
        os.close(fd)


def append_line(path, line: bytes) -> None:
    """Append one ``\\n``-terminated line to the log ``path`` and make it durable, or raise OutputError.

    A failed append is cut off again where possible; a reader skips a line it cannot parse, so the worst a
    crash mid-append can do is lose that line (a log of commits then redoes a song: never the reverse).
    """
    path = Path(path)
    if not line.endswith(b"\n"):
        raise ValueError("a log line ends in a newline")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise output_error(path, e) from None
    try:
        start = os.fstat(fd).st_size
        try:
            _write_all(fd, line)
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise output_error(path, e) from None
    finally:
        os.close(fd)


def read_lines(path) -> list[bytes]:
    """The complete lines of a log written by :func:`append_line` (a torn last line is left out)."""
    try:
        with open_regular(path) as f:
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    return [ln for ln in lines[:-1] if ln.strip()]
