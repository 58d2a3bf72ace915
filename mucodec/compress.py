"""Files in, files out: a loaded model (a ``MuCodec``) between audio files and ``.mct`` token files.

    from mucodec import compress
    compress.encode_file(model, "song.flac", "song.mct")     # audio file -> token file
    compress.decode_file(model, "song.mct", "song.wav", DecodingOptions(seed=0))   # token file -> WAV, streamed

Every output is written into a temporary file and renamed at the end, so a failure leaves nothing.
"""
from __future__ import annotations

from pathlib import Path

from . import audio, decoding, tokens
from .settings import DecodingOptions, EncodingOptions


def encode_file(model, src, dst, options: EncodingOptions = EncodingOptions()) -> Path:
    """Audio file ``src`` -> token file ``dst`` (``.mct``, written atomically). Returns ``dst``.

    The token file records the length of the audio at 48 kHz (decoders cut to it) and the rate
    and channel count of ``src`` as stored.
    """
    info = audio.audio_info(src)
    wav = audio.load_audio(src, model.sample_rate)
    codes = model.sound2code(wav, batch_size=options.batch_size)
    return tokens.save_codes(dst, codes, num_samples=wav.shape[-1], original_sample_rate=info.sample_rate,
                             original_channels=info.channels, **_token_fields(model))


def decode_file(model, src, dst, options: DecodingOptions = DecodingOptions(), *, prompt=None) -> Path:
    """Token file ``src`` -> 48 kHz stereo ``dst`` (32-bit float WAV; 24-bit FLAC when it ends in .flac),
    written window by window into a temporary file renamed at the end (a failure leaves nothing).
    ``options``: steps (default: the official code2sound's), guidance, seed; ``prompt`` as ``code2sound``."""
    return _write(model, dst, decoding.stream(model, src, options.for_task("code2sound"), prompt=prompt))


def reconstruct_file(model, src, dst, options: DecodingOptions = DecodingOptions(),
                     encoding: EncodingOptions = EncodingOptions(), *, prompt=None) -> Path:
    """Audio file ``src`` -> encoded and decoded (the official ``sound2sound``: 50 steps by default) -> WAV
    ``dst``, cut to the input's length and written as :func:`decode_file` does."""
    wav = audio.load_audio(src, model.sample_rate)
    codes = model.sound2code(wav, batch_size=encoding.batch_size)
    n = wav.shape[-1]
    del wav  # the decoder never needs the input again: hold only the codes
    return _write(model, dst, decoding.stream(model, codes, options.for_task("sound2sound"), num_samples=n,
                                              prompt=prompt))


def _write(model, dst, pieces) -> Path:
    # the name says the format: .flac is FLAC (24-bit), anything else float WAV
    fmt = "flac" if Path(dst).suffix.lower() == ".flac" else "wav"
    with audio.audio_writer(dst, model.sample_rate, 2, fmt) as write:
        for piece in pieces:
            write(piece)
    return Path(dst)


def _token_fields(model) -> dict:
    return {k: v for k, v in model.token_spec.items() if k != "num_codebooks"}
