"""Peak memory does not grow with the song beyond one copy of its audio (tools/peak_memory.py).

Each measurement runs in its own process (peak RSS never goes down), encoding one window at a time so
the fixed per-window memory stays small beside the song. Between a 130 s and a 900 s song the audio
grows by 282 MiB (float32 stereo at 48 kHz); the whole run may grow by at most 1.3 times that plus
32 MiB of allocator noise. Holding a second float copy of the song (a doubled signal, a whole-song
output buffer, an input kept while decoding) would add another 282 MiB and fail.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "peak_memory.py"
SHORT, LONG = 130, 900


def measure(ckpt, workdir, seconds, mode, *extra) -> dict:
    r = subprocess.run([sys.executable, str(TOOL), "--ckpt", str(ckpt), "--seconds", str(seconds), "--mode", mode,
                        "--workdir", str(workdir), "--batch-size", "1", *extra], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mode, extra", [("encode", ()), ("reconstruct", ("--stub-decoder",))])
def test_memory_grows_with_the_song_by_at_most_its_audio(tiny_ckpt_dir, tmp_path, mode, extra):
    short, long = (measure(tiny_ckpt_dir, tmp_path, s, mode, *extra) for s in (SHORT, LONG))
    audio = long["audio_mib"] - short["audio_mib"]
    assert audio > 250
    assert long["growth_mib"] - short["growth_mib"] <= 1.3 * audio + 32, (short, long)
