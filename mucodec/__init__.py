"""MuCodec: a dependency-light reimplementation of the 0.35 kbps music codec.

    from mucodec import MuCodec, load_audio, save_codes, load_codes
    codec = MuCodec.from_pretrained(".")            # tools/, muq_dev/, ckpt/ of the official layout
    codes = codec.sound2code(load_audio("song.flac"))   # LongTensor (1, 1, T), 25 codes per second
    wav = codec.code2sound(codes)                   # (2, T * 1920) float32 at 48 kHz
"""
from .audio import load_audio
from .codec import CodecConfig, MuCodec
from .errors import AudioError, CheckpointError, MuCodecError, TokenFileError
from .tokens import load_codes, save_codes

__all__ = ["MuCodec", "CodecConfig", "load_audio", "save_codes", "load_codes",
           "MuCodecError", "CheckpointError", "AudioError", "TokenFileError"]
