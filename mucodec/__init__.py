"""MuCodec: a dependency-light reimplementation of the 0.35 kbps music codec.

    import mucodec
    codes = mucodec.sound2code("song.flac")              # LongTensor (1, 1, T), 25 codes per second
    wav = mucodec.code2sound(codes)                      # (2, T * 1920) float32 at 48 kHz

    model = mucodec.load_model(".", device="cuda")       # tools/, muq_dev/, ckpt/ of the official layout
    from mucodec import compress
    compress.encode_file(model, "song.flac", "song.mct") # token files (0.35 kbit/s)
    compress.decode_file(model, "song.mct", "song.wav", mucodec.DecodingOptions(seed=0))
"""
from .api import code2sound, current_model, load_model, sound2code, sound2sound
from .audio import load_audio, write_wav
from .codec import CodecConfig, MuCodec
from .errors import (ArgumentError, AudioError, CheckpointError, CodesError, MuCodecError, NumericalError,
                     OutputError, TokenFileError)
from .settings import DecodingOptions, EncodingOptions, JobOptions
from .tokens import load_codes, save_codes

__all__ = ["load_model", "current_model", "sound2code", "code2sound", "sound2sound", "MuCodec", "CodecConfig",
           "DecodingOptions", "EncodingOptions", "JobOptions", "load_audio", "write_wav", "save_codes", "load_codes", "MuCodecError", "CheckpointError", "AudioError",
           "TokenFileError", "CodesError", "ArgumentError", "OutputError", "NumericalError"]
