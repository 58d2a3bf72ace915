"""Synthesise the demo clip ``test_wav/test.wav``: 10 s of 48 kHz stereo music, 16-bit PCM.

The official repository ships a song from the Million Song Dataset; we cannot redistribute that,
so this script writes a licence-clean stand-in made only from arithmetic: a I-vi-IV-V progression
(C, Am, F, G; 2.5 s each) as a soft pad, an arpeggio panned left/right, a bass line, and
kick / snare / hi-hat from shaped noise. The output is deterministic (fixed seed, plain numpy),
peaks at 0.7 (below the codec's 0.8 normalisation threshold) and is about 1.9 MB.

    python3 tools/make_test_wav.py [OUTPUT]      # default: test_wav/test.wav next to this folder
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 48000
SECONDS = 10.0
BPM = 96.0
PEAK = 0.7
# MIDI notes of each chord (root position, around middle C) and of its bass note.
CHORDS = [(60, 64, 67), (57, 60, 64), (53, 57, 60), (55, 59, 62)]
BASS = [36, 33, 29, 31]


def hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12)


def adsr(n: int, attack: float, decay: float, sustain: float, release: float) -> np.ndarray:
    """Envelope of n samples: linear attack and release, exponential decay towards `sustain`."""
    t = np.arange(n) / SR
    env = np.where(t < attack, t / max(attack, 1e-9), sustain + (1 - sustain) * np.exp(-(t - attack) / decay))
    tail = t > n / SR - release
    env[tail] *= (n / SR - t[tail]) / release
    return env


def tone(freq: float, n: int, harmonics=(1.0, 0.5, 0.25), detune: float = 0.0) -> np.ndarray:
    t = np.arange(n) / SR
    out = np.zeros(n)
    for k, amp in enumerate(harmonics, start=1):
        out += amp * np.sin(2 * np.pi * freq * k * (1 + detune) * t)
    return out


def add(track: np.ndarray, start: float, sound: np.ndarray, gain=(1.0, 1.0)) -> None:
    """Mix a mono sound into the stereo track at `start` seconds with per-channel gains."""
    i = int(round(start * SR))
    n = min(len(sound), track.shape[1] - i)
    if n > 0:
        track[0, i:i + n] += gain[0] * sound[:n]
        track[1, i:i + n] += gain[1] * sound[:n]


def synthesise() -> np.ndarray:
    """The clip as float64 (2, 480000) in [-PEAK, PEAK]."""
    rng = np.random.default_rng(20240601)
    total = int(SECONDS * SR)
    track = np.zeros((2, total))
    beat = 60.0 / BPM
    bar = SECONDS / len(CHORDS)

    for c, (chord, bass) in enumerate(zip(CHORDS, BASS)):
        t0 = c * bar
        n_bar = int(bar * SR)
        for j, note in enumerate(chord):  # pad: slightly detuned copies, spread across the image
            pad = adsr(n_bar, 0.3, 0.8, 0.6, 0.4) * (tone(hz(note), n_bar, (1, .3, .1), 0.0015)
                                                     + tone(hz(note), n_bar, (1, .3, .1), -0.0015))
            pan = (j - 1) * 0.5
            add(track, t0, 0.05 * pad, (1 - pan * 0.5, 1 + pan * 0.5))
        n_bass = int(beat * SR)
        for k in range(int(bar / beat)):  # bass on every beat
            add(track, t0 + k * beat, 0.22 * adsr(n_bass, 0.01, 0.25, 0.3, 0.08) * tone(hz(bass), n_bass, (1, .4, .15)))
        step = beat / 2
        n_arp = int(step * SR)
        pattern = [0, 1, 2, 1, 0, 2, 1, 2]
        for k in range(int(bar / step)):  # arpeggio in eighths, an octave up, alternating sides
            note = chord[pattern[k % len(pattern)]] + 12
            side = 0.75 if k % 2 == 0 else 0.25
            pluck = adsr(n_arp, 0.005, 0.12, 0.0, 0.02) * tone(hz(note), n_arp, (1, .6, .3, .15))
            add(track, t0 + k * step, 0.09 * pluck, (2 * (1 - side), 2 * side))

    n_beats = int(SECONDS / beat)
    for k in range(n_beats):
        t0 = k * beat
        n = int(0.25 * SR)
        t = np.arange(n) / SR
        if k % 2 == 0:  # kick: a sine whose pitch falls from 120 to 45 Hz
            freq = 45 + 75 * np.exp(-t / 0.03)
            kick = np.sin(2 * np.pi * np.cumsum(freq) / SR) * np.exp(-t / 0.12)
            add(track, t0, 0.45 * kick)
        else:  # snare: a noise burst plus a short 190 Hz body
            snare = (rng.standard_normal(n) * np.exp(-t / 0.05) + 0.6 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.04))
            add(track, t0, 0.12 * snare, (0.9, 1.1))
        for h in range(2):  # hi-hat: differenced (high-passed) noise, tight decay
            m = int(0.06 * SR)
            hat = np.diff(rng.standard_normal(m + 1)) * np.exp(-np.arange(m) / SR / 0.012)
            add(track, t0 + h * beat / 2, 0.04 * hat, (1.2, 0.8))

    fade = int(0.05 * SR)  # avoid clicks at both ends
    track[:, :fade] *= np.linspace(0, 1, fade)
    track[:, -fade:] *= np.linspace(1, 0, fade)
    return track * (PEAK / np.abs(track).max())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "test_wav" / "test.wav"
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(out, synthesise().T, SR, subtype="PCM_16")
    print(f"wrote {out} ({SECONDS:g} s, {SR} Hz, stereo, 16-bit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
