"""Errors a user can cause. Each message is one sentence that names the file and the fix."""


class MuCodecError(Exception):
    """Base class of every error MuCodec reports to a user (the CLI prints it without a traceback)."""


class CheckpointError(MuCodecError):
    """A checkpoint is missing, unreadable, or lacks/misshapes a tensor the computation needs."""


class AudioError(MuCodecError):
    """An input audio file or tensor cannot be used (unreadable, empty, NaN/inf samples...)."""


class TokenFileError(MuCodecError):
    """A token file is not a valid MuCodec token file, or codes are out of range."""
