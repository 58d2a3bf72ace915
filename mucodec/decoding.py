"""The decoder's schedule: codes -> 40.96 s windows of flow-matching latents -> 48 kHz stereo.

A song's codes are cut into windows of 1024 codes every 768 (:func:`decode_windows`); each window
starts from the last 128 latent frames of the one before (:class:`SongDecode`), runs through the codec's
stage calls (``decode_window``: quantizer and flow decoder; ``latents_to_wave``: VAE and vocoder), and
the windows' audio is crossfaded (:class:`OverlapAdd`) and given out as soon as it is final.
:func:`decode_step` advances several songs by one window as one batch; :func:`iter_decode` and
:func:`code2sound` decode one song. Every function takes the codec (a loaded ``MuCodec``) first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import audio, tokens
from .settings import DecodingOptions, build, generator_for, whole_number
from .errors import ArgumentError, AudioError, CheckpointError, NumericalError


def repeat_to(x: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate ``x`` with itself (doubling, as the official code does) until it is >= n long."""
    while x.shape[-1] < n:
        x = torch.cat([x, x], -1)
    return x


def randn(shape, generator, device) -> torch.Tensor:
    """Standard normals drawn on the CPU (the official draw order and values), then moved."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


@dataclass(frozen=True)
class Prompt:
    """A checked prompt: the part of the reference audio the decoder reads, (2, N) float32 at 48 kHz."""

    wav: torch.Tensor


class OverlapAdd:
    """Joins decoder windows of ``window`` samples placed every ``hop`` samples, as the official code.

    Each overlap is crossfaded (:func:`audio.crossfade`); a window shorter than ``window`` counts as
    zero-padded (the official output buffer starts as zeros). Samples are given out as soon as no
    later window can change them, so a decode holds at most one window of audio.
    """

    def __init__(self, window: int, hop: int):
        if not window - hop <= hop <= window:
            raise ValueError(f"hop {hop} must lie in [{window - hop}, {window}]: overlaps may not span two windows")
        self.window, self.hop = window, hop
        self._tail = None  # the part of the last window the next one crossfades into

    def add(self, wav: torch.Tensor, last: bool):
        """Add the next window (C, <= window); yields the pieces that became final."""
        wav = wav[:, : self.window]
        if wav.shape[-1] < self.window:
            wav = torch.nn.functional.pad(wav, (0, self.window - wav.shape[-1]))
        if self._tail is not None:
            ov = self._tail.shape[-1]
            wav = torch.cat([audio.crossfade(self._tail, wav[:, :ov]), wav[:, ov:]], -1)
        if last:
            self._tail = None
            yield wav
            return
        self._tail = wav[:, self.hop:]
        yield wav[:, : self.hop]


class SongDecode:
    """One song's decode as a sequence of windows: what :func:`code2sound` carries from one window
    to the next (codes, the song's own generator, the previous window's latents, the crossfade).

    Noise is drawn from the song's generator in the official order (the first window's in-context
    latents, the prompt's VAE samples, then per window its fresh in-context frames and its initial
    noise), so batching songs together never changes what any song draws.
    """

    def __init__(self, codec, codes: torch.Tensor, limit: int, generator=None, prompt=None, noise=None):
        c = codec.config
        self.codec, self.generator, self.noise = codec, generator, noise
        self.shape = (1, codec.flow.cfg.latent_channels, c.window_latents, codec.flow.cfg.freq_bins)
        codes = codes.to(codec.device)
        self._first = self._randn(self.shape)
        self.prompt_frames = prefix_codes = 0
        if prompt is not None:
            prompt_latent, prompt_code = prompt_latents(codec, prompt, generator)
            self.prompt_frames = prompt_latent.shape[2]
            self._first = torch.cat([prompt_latent, self._first[:, :, self.prompt_frames:]], 2)
            prefix_codes = prompt_code.shape[-1]
            codes = torch.cat([prompt_code.to(codec.device), codes], -1)
        # the official expression (1920 samples per code), kept in float arithmetic
        self.remaining = min(limit, int((codes.shape[-1] - prefix_codes) / (4 * c.frame_rate) * 4 * c.sample_rate))
        self.num_samples = self.remaining
        self.starts = decode_windows(codec, codes.shape[-1])
        padded = c.padded_codes(codes.shape[-1])
        self.codes = repeat_to(codes, padded)[..., :padded]
        self.joiner = OverlapAdd(c.window_codes * c.samples_per_code, c.hop_codes * c.samples_per_code)
        self.window, self.prev, self.done = 0, None, False

    def _randn(self, shape) -> torch.Tensor:
        return randn(shape, generator=self.generator, device=self.codec.device)

    def window_inputs(self):
        """(codes (1, 1, 1024), in-context latents (1, 32, 512, 32), prefix frames, initial noise) of the
        next window; draws that window's noise."""
        c, k = self.codec.config, self.window
        if k == 0:
            true_latents, incontext = self._first, self.prompt_frames
        else:
            overlap = c.overlap_latents
            fresh = self._randn(self.shape[:2] + (self.shape[2] - overlap, self.shape[3]))
            true_latents, incontext = torch.cat([self.prev[:, :, -overlap:], fresh], 2), overlap
        x0 = self.noise[k].to(self.codec.device, torch.float32) if self.noise is not None else self._randn(self.shape)
        start = self.starts[k]
        return self.codes[..., start:start + c.window_codes], true_latents, incontext, x0

    def audible(self, latents: torch.Tensor) -> torch.Tensor:
        """The part of a window's latents that becomes sound (the prompt's frames do not)."""
        return latents[:, :, self.prompt_frames:] if self.window == 0 else latents

    def take(self, latents: torch.Tensor, wav: torch.Tensor) -> list[torch.Tensor]:
        """Record the finished window; returns the pieces of output that became final."""
        last = self.window == len(self.starts) - 1
        pieces = []
        for piece in self.joiner.add(wav, last=last):
            piece = piece[:, :self.remaining]
            self.remaining -= piece.shape[-1]
            if piece.shape[-1]:
                pieces.append(piece)
        self.prev, self.window = latents, self.window + 1
        # later windows cannot change what was already given out
        self.done = last or self.remaining <= 0
        return pieces

    @property
    def windows(self) -> int:
        return len(self.starts)


# ---- the window plan and the step loop -----------------------------------------------------------
def decode_windows(codec, n: int) -> list[int]:
    """Start (in codes) of each decoder window for ``n`` codes: windows of 1024 codes every 768."""
    c = codec.config
    return list(range(0, c.padded_codes(n) - c.hop_codes, c.hop_codes))


def start_decode(codec, codes, *, num_samples: int | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, where: str = "codes") -> SongDecode:
    """One song's decode as a :class:`SongDecode`, for :func:`decode_step` batches of several songs.

    Arguments as :func:`iter_decode` (no prompt or injected noise); ``where`` names the codes in errors.
    A song stepped in any batch gives what ``code2sound(codes, seed=seed)`` gives alone, up to the
    batch-size dependence of the matrix kernels (``tests/test_decode_library.py``)."""
    require_decoder(codec)
    codes, limit = read_codes(codec, codes, num_samples, where)
    return SongDecode(codec, codes, limit, generator_for(seed, generator))


def decode_step(codec, songs: list[SongDecode], opts: DecodingOptions, callback=None,
                on_song=None, on_error=None) -> list[list[torch.Tensor] | None]:
    """The next window of each unfinished song, as one batch through the flow decoder (batch 2B with
    guidance), then each song's window through the VAE and vocoder on its own (one window's VAE
    activations are GBs; a batch would multiply the peak for no gain on a device one window already
    fills). Returns, per song, the (2, n) float32 CPU pieces of its output that became final.
    ``on_song(i, pieces)`` gets song i's pieces as soon as they are final, before the next song's VAE and
    vocoder run (a listener of song 0 need not wait for the whole batch). ``on_error(i, error)``: song i's
    NaN or infinite output (:class:`NumericalError`) fails song i alone -- its entry is None, its window not
    taken, the other songs go on; without it the error is raised."""
    inputs = [s.window_inputs() for s in songs]
    codes, true_latents, x0 = (torch.cat([i[j] for i in inputs]) for j in (0, 1, 3))
    incontext = [i[2] for i in inputs]
    latents = codec.decode_window(codes, true_latents, incontext[0] if len(songs) == 1 else incontext, x0, opts,
                                  callback=callback, check=on_error is None)
    out = []
    for i, (song, lat) in enumerate(zip(songs, latents.split(1))):
        try:
            if on_error is not None:  # each song's own latents: batched songs never mix, a NaN stays in its row
                codec.check_latents(lat)
            # the song's end can lie inside the window: the vocoder skips what cannot reach it
            wav = codec.latents_to_wave(song.audible(lat), opts.fast_vocoder, num_samples=song.remaining).cpu()
        except NumericalError as e:
            if on_error is None:
                raise
            on_error(i, e)
            out.append(None)
            continue
        out.append(song.take(lat, wav))
        if on_song is not None:
            on_song(i, out[-1])
    return out


# ---- one song: the official functions ------------------------------------------------------------
@torch.inference_mode()
def code2sound(codec, codes, *, num_steps: int | None = None, guidance_scale: float | None = None,
               prompt=None, prompt_sample_rate: int | None = None, seed: int | None = None,
               generator: torch.Generator | None = None, noise=None, fast_vocoder: bool = True,
               sampler: str | None = None, guidance_interval=None,
               schedule: str | None = None) -> torch.Tensor:
    """Codes -> audio (2, T * 1920) float32 at 48 kHz on the CPU, as the official ``code2sound``.

    ``codes``: LongTensor (1, 1, T), (1, T) or (T,) of integers in [0, 16384), or the path of a
    ``.mct`` token file (the output is then cut to the length of the audio it was made from).
    ``num_steps`` Euler steps per window (default 20, the official value); classifier-free
    ``guidance_scale`` >= 1 (default 1.5; 1 turns guidance off; the official code ignores its
    argument and always uses 1.5). ``prompt``: reference audio (a path, or a waveform at
    ``prompt_sample_rate``, default 48 kHz) whose first 10.24 s start the first window.
    ``seed`` (or a CPU ``generator``) makes decoding reproducible; draws follow the official
    order. ``noise``: one (1, 32, 512, 32) tensor per window, the initial noise of each window,
    for bit-exact comparison with the official code. ``fast_vocoder`` (default) computes each mel
    frame once (plus the chunk edges) instead of running the official overlapping vocoder chunks:
    ~2.5x less vocoder work, equal to the official chunks up to float rounding (~1e-6);
    ``fast_vocoder=False`` runs the official schedule. ``sampler``: the ODE solver, ``euler`` (default,
    the official one), ``heun`` (2 DiT evaluations per step) or ``ab2`` (:mod:`samplers`).
    ``guidance_interval`` (a, b) in [0, 1]: guidance only at flow times t in [a, b]; elsewhere the
    DiT runs the conditional half alone (half the batch). Default: guidance at every evaluation.
    ``schedule``: the flow times of the steps, ``uniform`` (default, the official one) or ``cosine``
    (denser near t = 0; docs/sampling.md).
    """
    return torch.cat(list(codec.iter_decode(
        codes, num_steps=num_steps, guidance_scale=guidance_scale, prompt=prompt,
        prompt_sample_rate=prompt_sample_rate, seed=seed, generator=generator, noise=noise,
        fast_vocoder=fast_vocoder, sampler=sampler, guidance_interval=guidance_interval, schedule=schedule)), -1)


def iter_decode(codec, codes, *, num_samples: int | None = None, num_steps: int | None = None,
                guidance_scale: float | None = None, prompt=None, prompt_sample_rate: int | None = None,
                seed: int | None = None, generator: torch.Generator | None = None, noise=None,
                fast_vocoder: bool = True, sampler: str | None = None, guidance_interval=None,
                schedule: str | None = None):
    """:func:`code2sound` as a stream: yields (2, n) float32 CPU pieces of the output in order, one per
    decoder window, so a long song never has to be held whole (``compress.decode_file`` writes them as
    they come). ``num_samples`` cuts the output shorter (a token file's own length is applied anyway).
    Arguments are checked before any work starts.
    """
    options = build(DecodingOptions, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                    fast_vocoder=fast_vocoder, sampler=sampler,
                    guidance_interval=guidance_interval, schedule=schedule).for_task("code2sound")
    return stream(codec, codes, options, num_samples=num_samples, prompt=prompt,
                  prompt_sample_rate=prompt_sample_rate, generator=generator, noise=noise)


def stream(codec, codes, options: DecodingOptions, *, num_samples: int | None = None, prompt=None,
           prompt_sample_rate: int | None = None, generator: torch.Generator | None = None, noise=None):
    """:func:`iter_decode` with its settings as one resolved :class:`DecodingOptions` (the form files, jobs
    and the server pass down). Everything is checked before the first window runs."""
    require_decoder(codec)
    codes, limit = read_codes(codec, codes, num_samples)
    generator = generator_for(options.seed, generator)
    if prompt is not None:
        codec.require_encoder()
        prompt = prepare_prompt(codec, prompt, sample_rate=prompt_sample_rate)
    windows = decode_windows(codec, codes.shape[-1] + (prompt_codes(codec, prompt) if prompt is not None else 0))
    noise = check_noise(codec, noise, len(windows))
    # through the codec, so that a codec can replace the model work behind these checks (the CLI tests' fake)
    return codec.decode_checked(codes, limit, options, generator, prompt, noise)


def decode_checked(codec, codes: torch.Tensor, limit: int, opts: DecodingOptions, generator, prompt, noise):
    """Generator behind :func:`stream`; arguments are already checked, ``opts`` resolved.

    Model work runs in inference mode window by window (a mode held across ``yield`` would leak
    into the caller's code between pieces).
    """
    song = SongDecode(codec, codes, limit, generator, prompt, noise)
    bar = tqdm(total=len(song.starts) * opts.num_steps, desc="decode", unit="step", disable=not codec.progress,
               leave=False)
    while not song.done:
        for pieces in decode_step(codec, [song], opts, callback=lambda *a: bar.update(1)):
            yield from pieces
    bar.close()


@torch.inference_mode()
def sound2sound(codec, audio_in, *, sample_rate: int | None = None, batch_size: int | None = None,
                num_steps: int | None = None, guidance_scale: float | None = None, prompt=None,
                prompt_sample_rate: int | None = None, seed: int | None = None,
                generator: torch.Generator | None = None, noise=None, fast_vocoder: bool = True,
                sampler: str | None = None, guidance_interval=None,
                schedule: str | None = None) -> torch.Tensor:
    """The official round trip ``code2sound(sound2code(audio))`` with 50 steps by default, cut to the
    input's length: (2, N) float32 at 48 kHz. Arguments as in ``sound2code`` and :func:`code2sound`."""
    options = build(DecodingOptions, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                    fast_vocoder=fast_vocoder, sampler=sampler,
                    guidance_interval=guidance_interval, schedule=schedule).for_task("sound2sound")
    wav = codec.read_audio(audio_in, sample_rate)
    codes = codec.sound2code(wav, batch_size=batch_size)
    return torch.cat(list(stream(codec, codes, options, num_samples=wav.shape[-1], prompt=prompt,
                                 prompt_sample_rate=prompt_sample_rate, generator=generator, noise=noise)), -1)


# ---- inputs of a decode: codes, noise, prompt ----------------------------------------------------
def require_decoder(codec) -> None:
    if codec.flow is None:
        raise CheckpointError("This MuCodec was loaded with encoder_only=True; load it again without it to decode.")


def read_codes(codec, codes, num_samples: int | None = None, where: str = "codes") -> tuple[torch.Tensor, int]:
    """Codes or a token file -> (LongTensor (1, 1, T), output length limit in samples, cut to ``num_samples``)."""
    if isinstance(codes, (str, os.PathLike)):
        codes, header = tokens.load_codes(codes, expect=codec.token_spec)
        limit = header["num_samples"]
    else:
        codes = tokens.validate_codes(codes, codec.codebook_size, where=where, num_codebooks=1)
        limit = codes.shape[-1] * codec.config.samples_per_code
    if num_samples is not None:
        limit = min(limit, whole_number("num_samples", num_samples))
    return codes, limit


def check_noise(codec, noise, windows: int):
    """None, or ``noise`` checked to hold one float tensor (1, 32, 512, 32) for each of ``windows`` windows."""
    if noise is None:
        return None
    if isinstance(noise, torch.Tensor) or not isinstance(noise, (list, tuple)):
        raise ArgumentError("noise must be a list with one tensor per decoder window.")
    shape = (1, codec.flow.cfg.latent_channels, codec.config.window_latents, codec.flow.cfg.freq_bins)
    if len(noise) < windows:
        raise ArgumentError(f"noise holds {len(noise)} tensors but this decode runs {windows} windows; "
                            f"pass one per window.")
    for k, t in enumerate(noise[:windows]):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ArgumentError(f"noise[{k}] must be a float tensor of shape {shape}, got {got}.")
    return list(noise)


def prepare_prompt(codec, prompt, *, sample_rate: int | None = None) -> Prompt:
    """Check a prompt once (path or waveform) -> the :class:`Prompt` :func:`code2sound` accepts as well.

    Only the part the decoder reads is kept (10.24 s, from 20.48 s on for prompts over 30.76 s,
    as the official code). Too short a prompt (under 2 codes' worth) is an error naming it.
    """
    if isinstance(prompt, Prompt):
        return prompt
    c = codec.config
    what = f"The prompt {os.fspath(prompt)}" if isinstance(prompt, (str, os.PathLike)) else "The prompt waveform"
    x = codec.read_audio(prompt, sample_rate)
    sr = c.sample_rate
    if x.shape[-1] < int(c.prompt_long_limit * sr):
        x = x[:, : int(c.prompt_seconds * sr)]
    else:
        x = x[:, int(c.prompt_long_start * sr): int((c.prompt_long_start + c.prompt_seconds) * sr)]
    shortest = c.codes_per_latent * c.samples_per_code  # one latent frame
    if x.shape[-1] < shortest:
        raise AudioError(f"{what} is {x.shape[-1] / sr:.3f} s long; a prompt needs at least "
                         f"{shortest / sr:.2f} s of audio.")
    return Prompt(x.contiguous())


def prompt_codes(codec, prompt: Prompt) -> int:
    """Codes the prompt adds in front of the stream (2 per prompt latent frame)."""
    frames = prompt.wav.shape[-1] // audio.TacotronConfig().hop_length + 1
    mel_frames_per_latent = codec.vae.cfg.downsampling if codec.vae is not None else 1
    return codec.config.codes_per_latent * (frames // mel_frames_per_latent)


@torch.inference_mode()
def prompt_latents(codec, prompt: Prompt, generator):
    """Prompt -> (latents (1, 32, Tp, 32), codes (1, 1, 2 Tp)) as the official code2sound."""
    c = codec.config
    x = prompt.wav.to(codec.device, torch.float32)
    log_mel, _ = audio.tacotron_log_mel(x)  # (2, frames, 256)
    encoder = codec.vae_encoder()
    latents = []
    for ch in range(log_mel.shape[0]):  # one channel at a time, as the official code
        mean, logvar = encoder.encode(log_mel[ch][None, None])
        eps = randn(mean.shape, generator=generator, device=codec.device)
        latents.append(encoder.sample_latent(mean, logvar, eps))
    lat = torch.cat(latents, 0)
    lat = lat.reshape(lat.shape[0] // 2, -1, lat.shape[2], lat.shape[3])
    codes = codec.sound2code(x)[..., : c.codes_per_latent * lat.shape[2]]
    return lat, codes
