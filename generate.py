#!/usr/bin/env python3
"""MuCodec from the command line and from a notebook.

Command line (``python3 generate.py --help`` lists every option)::

    python3 generate.py                           # the official demo: test_wav/test.wav -> reconstruct/test.wav
    python3 generate.py song.flac music/ 'live/*.mp3' -o out/     # reconstruct (encode + decode)
    python3 generate.py --encode song.flac -o tokens/             # song.flac -> tokens/song.mct (0.35 kbit/s)
    python3 generate.py tokens/song.mct -o out/                   # token file -> out/song.wav

Notebook::

    from generate import sound2code, code2sound
    codes = sound2code("song.flac")          # LongTensor (1, 1, T), 25 codes per second
    wav = code2sound(codes)                  # float tensor (2, T * 1920) at 48 kHz

Everything lives in the ``mucodec`` package; this script only re-exports its notebook API and runs
its command line (``mucodec.cli``).
"""
from mucodec.api import code2sound, load_model, sound2code, sound2sound  # noqa: F401  (the notebook API)
from mucodec.cli import cli

if __name__ == "__main__":
    cli()
