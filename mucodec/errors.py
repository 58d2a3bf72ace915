"""Errors a user can cause. Each message is one sentence that names the file (or argument) and the fix.

Every error the public API raises for a user's mistake is a :class:`MuCodecError`; the CLI prints
it without a traceback. Where Python has a natural base class for the mistake, the error is also
an instance of it (a bad argument value is a ``ValueError``), so ``except ValueError`` keeps working.
"""
import os
import stat


class MuCodecError(Exception):
    """Base class of every error MuCodec reports to a user."""


class CheckpointError(MuCodecError):
    """A checkpoint is missing, unreadable, of the wrong kind, or lacks/misshapes what the model needs."""


class AudioError(MuCodecError):
    """An input audio file or waveform cannot be used (unreadable, empty, NaN/inf samples, bad shape)."""


class TokenFileError(MuCodecError):
    """A token file is not a valid MuCodec token file, or was made for another model."""


class CodesError(MuCodecError, ValueError):
    """A code tensor is not integer, has the wrong shape, is empty, or holds codes outside the codebook."""


class ArgumentError(MuCodecError, ValueError):
    """An argument value is out of range or of the wrong kind (steps, guidance, batch size, device, noise...)."""


class OutputError(MuCodecError):
    """An output file or folder cannot be written (missing folder, permission, name too long...)."""


class NumericalError(MuCodecError):
    """A model stage produced NaN or infinite values (damaged weights, or too low a precision)."""


# ---- opening input files: one place for the checks every reader needs ----------------------------

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
