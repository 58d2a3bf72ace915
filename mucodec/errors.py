"""Errors a user can cause. Each message is one sentence that names the file (or argument) and the fix.

Every error the public API raises for a user's mistake is a :class:`MuCodecError`; the CLI prints
it without a traceback. Where Python has a natural base class for the mistake, the error is also
an instance of it (a bad argument value is a ``ValueError``), so ``except ValueError`` keeps working.
"""

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


class SettingError(ArgumentError):
    """A setting out of its range: ``name`` (the field), ``rule`` (what it must be), the value given."""

    def __init__(self, name: str, rule: str, value):
        self.name, self.rule = name, rule
        super().__init__(f"{name} {rule}, got {value!r}.")


class OutputError(MuCodecError):
    """An output file or folder cannot be written (missing folder, permission, name too long...)."""


class StorageError(OutputError):
    """The storage of an output fails as a whole: full (ENOSPC), over quota (EDQUOT), read-only (EROFS) or
    failing (EIO). Every later write there would fail the same way, so a job stops at the first one."""

    def __init__(self, message: str, path=None, errno: int | None = None):
        super().__init__(message)
        self.path, self.errno = path, errno


class NumericalError(MuCodecError):
    """A model stage produced NaN or infinite values (damaged weights, or too low a precision)."""
