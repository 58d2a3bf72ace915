"""Fine-tuning the decoder (mucodec/training.py, trainer.py, train_state.py) on the tiny models.

Windows here are short (a few latent frames instead of 512): the objective, the loop and the export do not
depend on the window length, and short windows keep each test to seconds.
"""
from __future__ import annotations

import pytest
import torch

from mucodec.checkpoint import read_checkpoint, resolve_files, state_dict_of
from mucodec.settings import DecodingOptions, EncodingOptions, JobOptions
from mucodec.codec import MuCodec
from mucodec.errors import ArgumentError, NumericalError
from mucodec.trainer import Trainer, TrainOptions
from mucodec.training import TRAINABLE, Draws, Windows, Objective, cfm_loss, dit_inputs, draw, set_trainable

FRAMES = 8  # latent frames per test window (16 codes)


@pytest.fixture
def fresh_codec(tiny_ckpt_dir):
    """A codec of its own: training changes its decoder's weights."""
    return MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu")


def windows(codec, n: int, seed: int = 0, frames: int = FRAMES, valid=None) -> Windows:
    g = torch.Generator().manual_seed(seed)
    c, w = codec.flow.cfg.latent_channels, codec.flow.cfg.freq_bins
    codes = torch.randint(0, codec.codebook_size, (n, 1, 2 * frames), generator=g)
    latents = codec.flow.normfeat.unproject(torch.randn(n, c, frames, w, generator=g))
    valid = torch.full((n,), frames) if valid is None else torch.tensor(valid)
    return Windows(codes, latents.bfloat16(), valid)


def options(**kw) -> TrainOptions:
    base = dict(max_steps=4, lr=3e-3, warmup_steps=1, ema_decay=0.9, checkpoint_every=2, validate_every=2,
                val_steps=2, log_every=1, max_prefix=3, seed=3, skip_visqol=True)
    return TrainOptions(**{**base, **kw})


def fit_killed_after_first_checkpoint(monkeypatch, fit) -> None:
    """Run ``fit()`` as a process that dies right after writing its first state/last.pt (a KeyboardInterrupt
    raised there); ``train_state.save`` is itself again afterwards."""
    from mucodec import train_state

    real_save = train_state.save

    def killed(path, obj):
        real_save(path, obj)
        if path.name == train_state.LAST:
            raise KeyboardInterrupt
    monkeypatch.setattr(train_state, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        fit()
    monkeypatch.setattr(train_state, "save", real_save)


# ---- the objective ------------------------------------------------------------------------------------
def test_loss_equals_the_formula_computed_by_hand(fresh_codec):
    """cfm_loss against the formula written out item by item, frame by frame, from the module's weights."""
    flow = fresh_codec.flow
    data = windows(fresh_codec, 2, valid=[FRAMES, 6])
    c, w = flow.cfg.latent_channels, flow.cfg.freq_bins
    g = torch.Generator().manual_seed(7)
    d = Draws(t=torch.tensor([0.3, 0.85]), noise=torch.randn(2, c, FRAMES, w, generator=g),
              prefix=torch.tensor([0, 3]), dropped=torch.tensor([False, True]))
    z_q, _ = fresh_codec.quantizer.from_codes(data.codes)
    latents = data.latents.float()
    got = cfm_loss(flow, z_q, latents, data.valid, d, Objective(max_prefix=3))

    lin = flow.cond_muencoder_emb
    mean = flow.normfeat.sum_x / flow.normfeat.counts
    std = (flow.normfeat.sum_x2 / flow.normfeat.counts - mean ** 2).sqrt()
    per_item = []
    for b in range(2):
        emb = z_q[b].T @ lin.weight.T + lin.bias                         # (codes, C/2 * W)
        cond = torch.stack([torch.cat([emb[2 * k].reshape(c // 2, w), emb[2 * k + 1].reshape(c // 2, w)])
                            for k in range(FRAMES)], 1)                  # (C, F, W): code 2k, then 2k+1
        if d.dropped[b]:
            cond = torch.zeros_like(cond)
        x1 = (latents[b] - mean[:, None, :]) / std[:, None, :]
        x0, t = d.noise[b], float(d.t[b])
        x_t = (1 - (1 - 1e-4) * t) * x0 + t * x1
        prefix = torch.zeros_like(x1)
        prefix[:, : int(d.prefix[b])] = x1[:, : int(d.prefix[b])]
        v = flow.estimator(torch.cat([x_t, prefix, cond])[None], torch.tensor([t]))[0]
        total, count = 0.0, 0
        for k in range(int(d.prefix[b]), int(data.valid[b])):
            total += float(((v[:, k] - (x1[:, k] - (1 - 1e-4) * x0[:, k])) ** 2).sum())
            count += c * w
        per_item.append(total / count)
    assert float(got) == pytest.approx(sum(per_item) / 2, rel=1e-5)


def test_masks_prefix_padding_and_dropped_condition(fresh_codec):
    flow = fresh_codec.flow
    data = windows(fresh_codec, 2)
    c, w = flow.cfg.latent_channels, flow.cfg.freq_bins
    d = Draws(t=torch.tensor([0.5, 0.5]), noise=torch.zeros(2, c, FRAMES, w), prefix=torch.tensor([2, 0]),
              dropped=torch.tensor([False, True]))
    z_q, _ = fresh_codec.quantizer.from_codes(data.codes)
    x, target, generated = dit_inputs(flow, z_q, data.latents.float(), data.valid, d, Objective(latent_length=5))
    prefix, cond = x[:, c:2 * c], x[:, 2 * c:]
    x1 = flow.normfeat.project(data.latents.float())
    assert torch.equal(prefix[0, :, :2], x1[0, :, :2]) and not prefix[0, :, 2:].any() and not prefix[1].any()
    # mask 0 (past latent_length): the padding embedding; a dropped item: zeros everywhere (the sampler's
    # unconditional branch)
    pad = flow.zero_cond_embedding1.reshape(c, 1, w).expand(c, FRAMES - 5, w)
    assert torch.equal(cond[0, :, 5:], pad) and not torch.equal(cond[0, :, :5], pad[:, :1].expand(c, 5, w))
    assert not cond[1].any()
    assert generated[:, 0, :, 0].tolist() == [[False] * 2 + [True] * 6, [True] * 8]
    assert torch.allclose(target, x1)  # zero noise: the velocity is x1
    draws = [draw(Objective(cond_drop=0.25, max_prefix=3), (4, c, FRAMES, w), torch.Generator().manual_seed(s))
             for s in range(200)]
    prefixes = torch.cat([e.prefix for e in draws])
    assert set(prefixes.tolist()) == {0, 1, 2, 3}
    assert 0.18 < float(torch.cat([e.dropped for e in draws]).float().mean()) < 0.32


def test_trainable_parts_and_options(fresh_codec):
    names = set_trainable(fresh_codec)
    assert names and all(n.startswith(TRAINABLE) for n in names)
    assert not any(p.requires_grad for p in fresh_codec.flow.normfeat.parameters())
    for frozen in (fresh_codec.muq, fresh_codec.quantizer, fresh_codec.vae, fresh_codec.vocoder):
        assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ArgumentError, match="grad_accum"):
        TrainOptions(grad_accum=0)
    with pytest.raises(ArgumentError, match="cond_drop"):
        TrainOptions(cond_drop=1.5)
    o = TrainOptions(max_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert [round(o.lr_factor(s), 6) for s in (0, 1, 2, 10)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 0.1]


def test_holdout_is_a_stable_fraction_of_song_ids():
    from mucodec.library.prepare import is_holdout

    ids = [f"{k:016x}" for k in range(2000)]
    held = [i for i in ids if is_holdout(i, 0.1)]
    assert 150 < len(held) < 250 and held == [i for i in ids if is_holdout(i, 0.1)]
    assert set(held) <= {i for i in ids if is_holdout(i, 0.2)}  # a larger fraction keeps the songs held before
    assert not any(is_holdout(i, 0.0) for i in ids) and all(is_holdout(i, 1.0) for i in ids)


def test_activation_checkpointing_gives_the_same_gradients(fresh_codec):
    flow = fresh_codec.flow
    set_trainable(fresh_codec)
    data = windows(fresh_codec, 2)
    z_q, _ = fresh_codec.quantizer.from_codes(data.codes)
    d = draw(Objective(max_prefix=3), tuple(data.latents.shape), torch.Generator().manual_seed(0))
    grads = []
    for recompute in (False, True):
        flow.estimator.checkpoint_blocks = recompute
        flow.zero_grad(set_to_none=True)
        cfm_loss(flow, z_q, data.latents.float(), data.valid, d, Objective()).backward()
        grads.append({n: p.grad.clone() for n, p in flow.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


# ---- the loop -----------------------------------------------------------------------------------------
def test_a_few_steps_lower_the_loss(fresh_codec, tiny_ckpt_dir, tmp_path):
    data = windows(fresh_codec, 2)
    z_q, _ = fresh_codec.quantizer.from_codes(data.codes)
    fixed = draw(Objective(cond_drop=0.0, max_prefix=3), tuple(data.latents.shape), torch.Generator().manual_seed(1))

    def loss():
        with torch.no_grad():
            return float(cfm_loss(fresh_codec.flow, z_q, data.latents.float(), data.valid, fixed, Objective()))

    def distance():
        """Relative L2 distance of the decoded latents (fixed noise, 4 Euler steps) to the windows' own latents."""
        noise = torch.randn(data.latents.shape, generator=torch.Generator().manual_seed(2))
        opts = DecodingOptions(num_steps=4, guidance_scale=1.0)
        got = fresh_codec.decode_window(data.codes, data.latents.float(), 0, noise, opts)
        return float((got - data.latents.float()).norm() / data.latents.float().norm())

    before, far = loss(), distance()
    Trainer(fresh_codec, data, None, tmp_path / "run", options(max_steps=30, ema_decay=0.0, cond_drop=0.0,
            checkpoint_every=30, log_every=30), resolve_files(tiny_ckpt_dir), log=lambda m: None).fit()
    # 30 steps take the tiny DiT from 3.74 to 2.26 on these windows; the halving over a few hundred
    # steps is test_training_extras.test_overfitting_four_clips_halves_the_loss
    assert loss() < 0.7 * before
    assert distance() < far


def test_resume_gives_the_same_weights_bit_for_bit(tiny_ckpt_dir, tmp_path, monkeypatch):
    from mucodec import train_state

    files = resolve_files(tiny_ckpt_dir)
    opts = options(max_steps=4, grad_accum=2, batch_size=2)
    codec = MuCodec.from_pretrained(tiny_ckpt_dir)
    Trainer(codec, windows(codec, 3), None, tmp_path / "a", opts, files, log=lambda m: None).fit()

    codec = MuCodec.from_pretrained(tiny_ckpt_dir)  # the process dies right after step 2's checkpoint
    fit_killed_after_first_checkpoint(monkeypatch, Trainer(codec, windows(codec, 3), None, tmp_path / "b", opts,
                                                           files, log=lambda m: None).fit)
    assert train_state.load(tmp_path / "b/state/last.pt")["step"] == 2
    codec = MuCodec.from_pretrained(tiny_ckpt_dir)
    Trainer(codec, windows(codec, 3), None, tmp_path / "b", opts, files, log=lambda m: None).fit()

    a, b = (train_state.load(tmp_path / r / "state/last.pt") for r in "ab")
    assert a["step"] == b["step"] == 4 and a["position"] == b["position"] == 16
    for key in ("weights", "ema"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key])
    assert torch.equal(a["generator"], b["generator"])
    rows = (tmp_path / "b/metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "1", "2", "3", "4"]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(fresh_codec, tiny_ckpt_dir, tmp_path):
    class Poisoned(Windows):
        def batch(self, position, size, seed):
            codes, latents, valid = super().batch(position, size, seed)
            return codes, latents * (float("nan") if position >= 2 else 1.0), valid

    good = windows(fresh_codec, 2)
    run = tmp_path / "run"
    trainer = Trainer(fresh_codec, Poisoned(good.codes, good.latents, good.valid), None, run, options(),
                      resolve_files(tiny_ckpt_dir), log=lambda m: None)
    with pytest.raises(NumericalError) as e:
        trainer.fit()
    msg = str(e.value)
    assert msg.count(". ") == 0 and "step 3" in msg and str(run / "state/last.pt") in msg and "intact" in msg
    from mucodec import train_state
    assert train_state.load(run / "state/last.pt")["step"] == 2
    assert not (run / "ckpt").exists()


def test_export_is_an_official_layout_checkpoint(fresh_codec, tiny_ckpt_dir, tmp_path):
    run = tmp_path / "run"
    files = resolve_files(tiny_ckpt_dir)
    card = Trainer(fresh_codec, windows(fresh_codec, 2), windows(fresh_codec, 1, seed=9), run, options(), files,
                   log=lambda m: None).fit()
    assert card["steps"] == 4 and card["exported"] == "best (EMA)" and card["validation"]["val_mel"] > 0
    base = state_dict_of(read_checkpoint(files["mucodec"], "mucodec"))
    new = state_dict_of(read_checkpoint(run / "ckpt/mucodec.pt", "mucodec"))
    assert list(new) == list(base) and all(new[k].shape == base[k].shape for k in base)
    changed = {k for k in base if not torch.equal(new[k], base[k])}
    trained = ("cfm_wrapper.estimator.", "cond_muencoder_emb.", "zero_cond_embedding1")
    assert changed and all(k.startswith(trained) for k in changed)
    tuned = MuCodec.from_pretrained(run)
    assert torch.equal(tuned.flow.estimator.proj_out.weight, new["cfm_wrapper.estimator.proj_out.weight"])
    original = MuCodec.from_pretrained(tiny_ckpt_dir)
    # the frozen encoder is the same, tensor for tensor, so it makes the same codes
    for stage in ("muq", "quantizer"):
        a, b = getattr(tuned, stage).state_dict(), getattr(original, stage).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    data = windows(tuned, 1, seed=5)
    noise = torch.randn(data.latents.shape, generator=torch.Generator().manual_seed(0))
    opts = DecodingOptions(num_steps=2, guidance_scale=1.5)
    lat = tuned.decode_window(data.codes, data.latents.float(), 0, noise, opts)
    assert not torch.equal(lat, original.decode_window(data.codes, data.latents.float(), 0, noise, opts))
    wav = tuned.latents_to_wave(lat)
    assert wav.shape == (2, FRAMES * 3840) and bool(torch.isfinite(wav).all())


# ---- preparing a library, and the command line --------------------------------------------------------
def write_music(folder, specs):
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, seconds in specs:
        sf.write(folder / name, (0.3 * rng.standard_normal((int(seconds * 48000), 2))).astype("float32"), 48000)
    return folder


@pytest.mark.slow
def test_prepare_then_fit_from_the_command_line(tmp_path, tiny_ckpt_dir):
    pytest.importorskip("pyarrow")
    from mucodec import library, train
    from mucodec.library.prepare import window_latents
    from mucodec.library.windows import load_windows

    music = write_music(tmp_path / "music", [("a.wav", 3.0), ("b.wav", 1.5)])
    (music / "bad.wav").write_bytes(b"not audio")
    data, run = tmp_path / "data", tmp_path / "run"
    # a music folder is prepared into RUN/data, then trained on; a failed file stops it before training
    argv = [music, "-o", tmp_path / "prep", "--ckpt", tiny_ckpt_dir, "--workers", 0, "--max-steps", 1, "-q"]
    assert train.main([str(a) for a in argv]) == 1
    data = tmp_path / "prep" / "data"
    assert [e["path"] for e in library.read_errors(data)] == ["bad.wav"] and not (tmp_path / "prep/ckpt").exists()
    (music / "bad.wav").unlink()
    assert train.main([str(a) for a in argv]) == 0  # resumed: the songs done are not prepared again, then trained
    assert (tmp_path / "prep/ckpt/mucodec.pt").exists()

    windows, held = load_windows(data, holdout=0.0)
    assert held is None and len(windows) == 2 and windows.latents.dtype == torch.bfloat16
    codec = MuCodec.from_pretrained(tiny_ckpt_dir)
    wav = codec.read_audio(str(music / "a.wav"))
    codes = codec.sound2code(wav)[0, 0]
    row = [i for i in range(2) if int(windows.valid[i]) == -(-wav.shape[-1] // 3840)]
    assert len(row) == 1  # valid frames: the song's own audio, 3 s = 37.5 latent frames -> 38
    got_codes = windows.codes[row[0], 0]
    n = codes.numel()
    assert torch.equal(got_codes[:n], codes) and torch.equal(got_codes[n:2 * n], codes)  # repeated as decoding does
    (_, _, lat), = window_latents(codec, wav, codes.numel())
    assert torch.equal(windows.latents[row[0]], lat.bfloat16())

    argv = [data, "-o", run, "--ckpt", tiny_ckpt_dir, "--max-steps", 2, "--holdout", 0, "--max-prefix", 4, "-q"]
    assert train.main([str(a) for a in argv]) == 0  # a prepared folder is trained on as it is
    assert (run / "config.json").exists() and (run / "model_card.json").exists() and not (run / "data").exists()
    assert MuCodec.from_pretrained(run).flow is not None
    assert train.main([str(a) for a in argv[:-1]] + ["--lr", "1", "-q"]) == 2  # other settings: refused


# ---- several processes ---------------------------------------------------------------------------------
def _ddp_worker(rank: int, ckpt: str, run: str, init: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        codec = MuCodec.from_pretrained(ckpt)
        Trainer(codec, windows(codec, 4), None, run, options(max_steps=3, batch_size=2, ema_decay=0.0, lr=1e-4,
                checkpoint_every=3), resolve_files(ckpt), log=lambda m: None).fit()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_with_the_whole_batch(tiny_ckpt_dir, tmp_path):
    from mucodec import train_state

    torch.multiprocessing.spawn(_ddp_worker, args=(str(tiny_ckpt_dir), str(tmp_path / "ddp"),
                                                   f"file://{tmp_path / 'rendezvous'}"), nprocs=2)
    codec = MuCodec.from_pretrained(tiny_ckpt_dir)
    start = {n: p.clone() for n, p in codec.flow.state_dict().items()}
    Trainer(codec, windows(codec, 4), None, tmp_path / "one", options(max_steps=3, batch_size=4, ema_decay=0.0,
            lr=1e-4, checkpoint_every=3), resolve_files(tiny_ckpt_dir), log=lambda m: None).fit()
    a, b = (train_state.load(tmp_path / r / "state/last.pt") for r in ("ddp", "one"))
    assert a["position"] == b["position"] == 12
    for n in a["weights"]:
        if n.endswith("attn1.to_k.bias"):
            # exactly, its gradient is zero (softmax ignores a shift shared by every key); in floats it is rounding
            # noise, which Adam scales to steps of +-lr whose signs differ between batch splits
            continue
        assert torch.allclose(a["weights"][n], b["weights"][n], rtol=0, atol=1e-6), n
    assert any(not torch.equal(b["weights"][n], start[n]) for n in b["weights"])  # the runs did train


@pytest.mark.slow
def test_prepare_resumes_after_an_interruption_and_shards_cover_every_song_once(tmp_path, tiny_ckpt_dir,
                                                                             monkeypatch):
    pytest.importorskip("pyarrow")
    from mucodec import library
    from mucodec.library import prepare

    music = write_music(tmp_path / "music", [(f"s{k}.wav", 1.0 + k / 4) for k in range(4)])
    options = EncodingOptions(batch_size=1)  # a song per batch and commit
    common = dict(ckpt=str(tiny_ckpt_dir), workers=0, shard_size=1)
    real_commit = prepare.TrainingSet.commit
    commits = []

    def crash_after_first(self, name, rows, errors, fp=None):
        real_commit(self, name, rows, errors, fp)
        commits.append(name)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare.TrainingSet, "commit", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_library([music], tmp_path / "all", options, JobOptions(**common))
    monkeypatch.setattr(prepare.TrainingSet, "commit", real_commit)
    assert len(commits) == 1 and len(library.read_library(tmp_path / "all", columns=["song_id"])) == 1
    rep = prepare.prepare_library([music], tmp_path / "all", options, JobOptions(**common))
    assert rep["songs"]["done"] == 3 and rep["songs"]["skipped"] == 1
    whole = library.read_library(tmp_path / "all", columns=["song_id", "window", "codes", "latents"])
    assert sorted(whole.column("song_id").to_pylist()) == sorted(library.song_id(f"s{k}.wav") for k in range(4))

    for i in (1, 2):  # --shard I/N counts from 1
        prepare.prepare_library([music], tmp_path / "parts", options, JobOptions(shard=(i, 2), **common))
    parts = library.read_library(tmp_path / "parts", columns=["song_id", "window", "codes", "latents"])
    assert parts.sort_by("song_id").equals(whole.sort_by("song_id"))  # every song once, the same bytes


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from mucodec.checkpoint import resolve_files
from mucodec.codec import MuCodec
from mucodec.trainer import Trainer
from test_training import options, windows
codec = MuCodec.from_pretrained({ckpt!r})
Trainer(codec, windows(codec, 3), None, {run!r}, options(max_steps=40, checkpoint_every=2),
        resolve_files({ckpt!r}), log=lambda m: None).fit()
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_same_weights(tiny_ckpt_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from mucodec import train_state

    files = resolve_files(tiny_ckpt_dir)
    run = tmp_path / "killed"
    code = CHILD.format(tests=str(Path(__file__).parent), ckpt=str(tiny_ckpt_dir), run=str(run))
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    last = run / "state" / train_state.LAST
    deadline = time.monotonic() + 120
    while not last.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere in the next steps, or in the middle of writing a checkpoint
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    stopped = train_state.load(last)["step"]
    assert 2 <= stopped < 40
    codec = MuCodec.from_pretrained(tiny_ckpt_dir)
    Trainer(codec, windows(codec, 3), None, run, options(max_steps=40, checkpoint_every=2), files,
            log=lambda m: None).fit()
    codec = MuCodec.from_pretrained(tiny_ckpt_dir)
    Trainer(codec, windows(codec, 3), None, tmp_path / "whole", options(max_steps=40, checkpoint_every=2), files,
            log=lambda m: None).fit()
    a, b = (train_state.load(r / "state" / train_state.LAST) for r in (run, tmp_path / "whole"))
    for key in ("weights", "ema"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key])
    assert torch.equal(a["generator"], b["generator"]) and a["position"] == b["position"]


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(fresh_codec, tiny_ckpt_dir, tmp_path, monkeypatch):
    """The step-4 checkpoint cannot be written (a full disk): the run stops with one sentence naming the run,
    nothing damaged and no temporary file is left, and the step-2 checkpoint still loads."""
    from mucodec import files, train_state
    from mucodec.errors import StorageError

    real = train_state.save

    def filling(path, obj):
        if obj.get("step") != 4:
            return real(path, obj)
        with files.inject_fault(100):  # the disk fills 100 bytes into the checkpoint
            return real(path, obj)

    monkeypatch.setattr(train_state, "save", filling)
    run = tmp_path / "run"
    with pytest.raises(StorageError) as e:
        Trainer(fresh_codec, windows(fresh_codec, 2), None, run, options(), resolve_files(tiny_ckpt_dir),
                log=lambda m: None).fit()
    assert str(e.value).count(". ") == 0 and str(run) in str(e.value)
    assert not [p for p in run.rglob("*") if p.name.endswith(files.TEMPORARY_SUFFIX)]
    assert train_state.load(run / "state/last.pt")["step"] == 2
