"""Jobs over a music library, resumable, sharded and exactly once: tokenising it, and decoding tokens to audio.

    from mucodec import library
    songs, problems = library.scan(["music/"], out="tokens/")
    result = library.encode_library(["music/"], "tokens/", job=JobOptions(ckpt=...))   # or the CLI: --encode music/ -o tokens/
    flat = library.load_flat("tokens/")              # uint16 codes of every song + offsets, for LM training
    result = library.decode_library(["tokens/"], "audio/", DecodingOptions(batch_size=8))  # or: generate.py tokens/ -o audio/

One machinery, one module per concern:

    songs.py       song ids, the songs of the inputs, ``--shard I/N`` and job tags
    store.py       a job's output folder: fingerprint, manifest, error rows, state read back at every start, report
    parquet.py     the shard schema, writing a shard, reading a token library back
    engine.py      the local engine: items -> worker reads -> the job's batcher -> the job's sink; plans, reports
    ray_engine.py  the same on Ray Data (imported only for ``engine="ray"``)
    encode.py      the encode job: window packing, reading audio, parquet shards and .mct files
    token_inputs.py  the decode job's inputs: token files, arrays and tables, their songs, reading their codes
    decode.py      the decode job: continuous batching across songs, writer threads, audio files

Listing the inputs (:mod:`mucodec.listing`) and the worker processes (:mod:`mucodec.workers`) live outside the
package, since the evaluation reads folders the same way without needing the jobs.

The encode job's output folder (format ``parquet``; ``mct`` writes ``<path without extension>.mct`` per song
instead, ``both`` does both)::

    fingerprint.json          what made the codes: checkpoint hashes, code version, batch size, dtype, ...
    manifest[-I-of-N].jsonl   the songs of one job: song_id, path, size, mtime
    shards/<job>-<n>.parquet  ~1000 songs each: song_id, path, duration, sample_rate, channels, num_samples,
                              num_codes, codes (list<uint16>)
    errors/<job>-<n>.jsonl    failed songs: song_id, path, stage, message, time
    index[-I-of-N].json       the committed shards of the job (informative: the shard files are the truth)
    report[-I-of-N].json      the last run: songs done/skipped/failed, hours per hour, windows/s, padding

Exactly once: a song's id is a hash of its path relative to the input folder. Every shard and error file
appears by an atomic rename, so a song is committed exactly when a shard file holding it exists; the state
is read back from those files on every start (temporary files of a crashed run are ignored and cleaned),
so a crash between two steps can neither lose nor duplicate a committed song. A job with no songs writes
nothing. pyarrow is imported only when parquet is written or read.
"""
from .decode import Result as DecodeResult, decode_library, song_seed
from .encode import Result, encode_library, read_song
from .engine import COMMIT_SECONDS, summary_line
from .parquet import FlatCodes, iter_codes, load_flat, read_library
from .songs import in_shard, parse_shard, scan, song_id
from .store import read_errors
from .token_inputs import is_token_input, read_tokens, scan_tokens

# The entry points (the two jobs), the readers of what they write, and the ids and shards they agree on; the
# machinery lives in the modules above.
__all__ = ["COMMIT_SECONDS", "DecodeResult", "FlatCodes", "Result", "decode_library", "encode_library", "in_shard",
           "is_token_input", "iter_codes", "load_flat", "parse_shard", "read_errors", "read_library", "read_song",
           "read_tokens", "scan", "scan_tokens", "song_id", "song_seed", "summary_line"]
