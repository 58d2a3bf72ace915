"""Fine-tuning beyond the loop itself: LoRA adapters (mucodec/lora.py), TensorBoard events
(mucodec/train_log.py) and the issue's overfitting criterion, on the tiny models."""
from __future__ import annotations

import pytest
import torch

from mucodec import lora, train_state
from mucodec.checkpoint import read_checkpoint, resolve_files, state_dict_of
from mucodec.codec import MuCodec
from mucodec.settings import DecodingOptions
from mucodec.trainer import Trainer
from mucodec.training import Objective, cfm_loss, draw
from test_training import fit_killed_after_first_checkpoint, options, windows

QUIET = dict(log=lambda m: None)


def test_lora_trains_only_the_adapters_and_merges_into_a_plain_checkpoint(tiny_ckpt_dir, tmp_path):
    codec = MuCodec.from_pretrained(tiny_ckpt_dir)
    before = {f"{stage}.{n}": p.detach().clone() for stage in ("muq", "quantizer", "flow", "vae", "vocoder")
              for n, p in getattr(codec, stage).named_parameters()}
    run = tmp_path / "run"
    trainer = Trainer(codec, windows(codec, 2), None, run, options(lora=2, ema_decay=0.0), resolve_files(tiny_ckpt_dir),
                      **QUIET)
    card = trainer.fit()
    blocks = len(codec.flow.estimator.transformer_blocks)
    assert len(trainer.names) == 2 * len(lora.TARGETS) * blocks and all(lora.is_adapter(n) for n in trainer.names)
    assert "LoRA rank 2" in card["exported"] and len(card["trained"]) == len(lora.TARGETS) * blocks
    # every base weight is bit-identical (an adapted weight's base lives on as ``parametrizations.weight.original``)
    after = {f"{stage}.{n.replace(lora.ORIGINAL, '.weight')}": p for stage in ("muq", "quantizer", "flow", "vae",
             "vocoder") for n, p in getattr(codec, stage).named_parameters() if not lora.is_adapter(n)}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.abs().sum() > 0 for n, p in trainer.params.items() if n.endswith("lora_B"))  # B left zero: trained

    base = state_dict_of(read_checkpoint(resolve_files(tiny_ckpt_dir)["mucodec"], "mucodec"))
    new = state_dict_of(read_checkpoint(run / "ckpt/mucodec.pt", "mucodec"))
    assert list(new) == list(base) and all(new[k].shape == base[k].shape for k in base)
    changed = {k for k in base if not torch.equal(new[k], base[k])}
    assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in changed} <= {
        t.rsplit(".", 1)[-1] + ".weight" for t in lora.TARGETS}
    assert len(changed) == len(lora.TARGETS) * blocks

    # the merged weights are computed as the adapted forward computes its weight, in float32, in the same
    # order: the plain checkpoint's DiT gives the adapted DiT's output exactly (no rounding between them)
    tuned = MuCodec.from_pretrained(run)
    x = torch.randn(2, codec.flow.estimator.cfg.in_channels, 8, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        assert torch.equal(tuned.flow.estimator(x, t), codec.flow.estimator(x, t))


def test_lora_resume_gives_the_same_adapters_bit_for_bit(tiny_ckpt_dir, tmp_path, monkeypatch):
    files = resolve_files(tiny_ckpt_dir)
    opts = options(lora=3, max_steps=4)
    codec = MuCodec.from_pretrained(tiny_ckpt_dir)
    Trainer(codec, windows(codec, 3), None, tmp_path / "a", opts, files, **QUIET).fit()
    codec = MuCodec.from_pretrained(tiny_ckpt_dir)
    fit_killed_after_first_checkpoint(monkeypatch, Trainer(codec, windows(codec, 3), None, tmp_path / "b", opts,
                                                           files, **QUIET).fit)
    stopped = train_state.load(tmp_path / "b/state/last.pt")
    assert stopped["step"] == 2 and all(lora.is_adapter(n) for n in stopped["weights"])  # adapters only
    codec = MuCodec.from_pretrained(tiny_ckpt_dir)
    Trainer(codec, windows(codec, 3), None, tmp_path / "b", opts, files, **QUIET).fit()
    a, b = (train_state.load(tmp_path / r / "state/last.pt") for r in "ab")
    for key in ("weights", "ema"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key])
    ma, mb = (state_dict_of(read_checkpoint(tmp_path / r / "ckpt/mucodec.pt", "mucodec")) for r in "ab")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_tensorboard_events_hold_the_loss(fresh_codec, tiny_ckpt_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    Trainer(fresh_codec, windows(fresh_codec, 2), windows(fresh_codec, 1, seed=9), run, options(),
            resolve_files(tiny_ckpt_dir), **QUIET).fit()
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert [e.step for e in loss] == [int(r[0]) for r in rows] == [1, 2, 3, 4]
    # the CSV keeps 6 significant digits, the event file a float32
    assert all(e.value == pytest.approx(float(r[1]), rel=1e-5) for e, r in zip(loss, rows))
    assert [e.step for e in acc.Scalars("val/val_mel")] == [2, 4]


def test_no_tensorboard_says_how_to_get_it(fresh_codec, tiny_ckpt_dir, tmp_path, monkeypatch):
    from mucodec import train_log

    monkeypatch.setattr(train_log, "summary_writer", lambda folder: None)
    said = []
    Trainer(fresh_codec, windows(fresh_codec, 2), None, tmp_path / "run", options(max_steps=2),
            resolve_files(tiny_ckpt_dir), log=said.append).fit()
    assert said.count(train_log.NO_TENSORBOARD) == 1 and "requirements-train.txt" in train_log.NO_TENSORBOARD
    assert (tmp_path / "run/metrics.csv").exists() and not (tmp_path / "run/tensorboard").exists()


def test_overfitting_four_clips_halves_the_loss(tiny_ckpt_dir, tmp_path):
    """The issue's criterion: 4 short clips, a few hundred steps, the training loss halved and the decoded
    latents closer to the clips' own. The tiny checkpoint's DiT (width 16) cannot: its output projection maps
    16 features to a token's 128 latent values, so 200 steps lower its loss by only ~22 %; a DiT of width 128
    (one block, the tiny checkpoint's other stages) has a full-rank output. Measured: 2.38 -> 0.77 (32 %),
    decoded latents' relative L2 distance 1.51 -> 0.83, ~9 s of one CPU core."""
    from mucodec.dit import DiTConfig
    from mucodec.flow import FlowDecoder, FlowDecoderConfig

    codec = MuCodec.from_pretrained(tiny_ckpt_dir)
    torch.manual_seed(0)
    flow = FlowDecoder(FlowDecoderConfig(cond_dim=codec.flow.cfg.cond_dim,
                                         dit=DiTConfig(num_heads=2, head_dim=64, num_layers=1, ff_mult=2)))
    flow.normfeat.load_state_dict(codec.flow.normfeat.state_dict())
    codec.flow = flow
    data = windows(codec, 4)
    latents = data.latents.float()
    z_q, _ = codec.quantizer.from_codes(data.codes)
    g = torch.Generator().manual_seed(1)
    fixed = [draw(Objective(cond_drop=0.0, max_prefix=3), tuple(latents.shape), g) for _ in range(4)]

    def loss():  # the training loss on fixed draws (4 times, t and noise), the same before and after
        with torch.no_grad():
            return sum(float(cfm_loss(flow, z_q, latents, data.valid, d, Objective())) for d in fixed) / len(fixed)

    def distance():  # decoded latents (fixed noise, 8 Euler steps, no guidance) to the clips' own
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
        got = codec.decode_window(data.codes, latents, 0, noise, DecodingOptions(num_steps=8, guidance_scale=1.0))
        return float((got - latents).norm() / latents.norm())

    before, far = loss(), distance()
    # the loop's own steps; no condition drop or EMA, so that the weights measured are the ones trained
    trainer = Trainer(codec, data, None, tmp_path / "run", options(max_steps=200, batch_size=4, lr=3e-3,
                      warmup_steps=10, ema_decay=0.0, cond_drop=0.0, seed=0), resolve_files(tiny_ckpt_dir), **QUIET)
    for _ in range(200):
        trainer.train_step()
    assert loss() <= 0.5 * before
    assert distance() < far


@pytest.fixture
def fresh_codec(tiny_ckpt_dir):
    return MuCodec.from_pretrained(tiny_ckpt_dir, device="cpu")


def test_validation_scores_visqol_when_the_eval_extra_is_installed(fresh_codec, tiny_ckpt_dir, tmp_path):
    pytest.importorskip("visqol")
    run = tmp_path / "run"
    # 1.28 s of audio, and a window with 0.48 s, too short for one ViSQOL patch: left out of its mean
    val = windows(fresh_codec, 2, seed=9, frames=16, valid=[16, 6])
    card = Trainer(fresh_codec, windows(fresh_codec, 2), val, run, options(max_steps=2, skip_visqol=False),
                   resolve_files(tiny_ckpt_dir), **QUIET).fit()
    assert 1.0 <= card["validation"]["val_visqol"] <= 5.0  # MOS-LQO's range
    header, *rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()]
    assert float(rows[-1][header.index("val_visqol")]) == pytest.approx(card["validation"]["val_visqol"], rel=1e-5)
    assert card["best_val_mel"] == card["validation"]["val_mel"]  # the mel distance still selects


def test_a_run_saved_before_the_lora_settings_resumes(fresh_codec, tiny_ckpt_dir, tmp_path):
    files, run = resolve_files(tiny_ckpt_dir), tmp_path / "run"
    opts = options(skip_visqol=False)  # the three settings at their defaults, as such a run had them
    Trainer(fresh_codec, windows(fresh_codec, 2), None, run, opts, files, **QUIET).fit()
    old = train_state.load(run / "state/last.pt")
    for name in ("lora", "lora_alpha", "skip_visqol"):
        del old["options"][name]
    train_state.save(run / "state/last.pt", old)
    said = []
    codec = MuCodec.from_pretrained(tiny_ckpt_dir)
    Trainer(codec, windows(codec, 2), None, run, opts, files, log=said.append)
    assert said == [f"resumed {run} at step 4"]
    from mucodec.errors import ArgumentError
    with pytest.raises(ArgumentError, match="other settings"):
        Trainer(MuCodec.from_pretrained(tiny_ckpt_dir), windows(codec, 2), None, run, options(lora=2), files, **QUIET)


@pytest.mark.slow
def test_torchrun_with_lora_equals_one_process_with_the_whole_batch(tiny_ckpt_dir, tmp_path):
    """The command line under ``torchrun --nproc-per-node 2`` (gloo on the CPU) with LoRA: each process takes half
    of every batch and DDP averages the adapters' gradients, so the adapters equal those of one process that
    takes the whole batch; the base weights of the exported checkpoint are untouched outside the adapted ones."""
    pytest.importorskip("pyarrow")
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mucodec import train
    from test_training import write_music

    root = Path(__file__).resolve().parent.parent
    music = write_music(tmp_path / "music", [(f"s{k}.wav", 1.0 + k / 4) for k in range(4)])
    prep = [music, "-o", tmp_path / "prep", "--ckpt", tiny_ckpt_dir, "--workers", 0, "--shard", "1/1", "-q"]
    assert train.main([str(a) for a in prep]) == 0  # torchrun's processes train on a prepared folder only
    data = tmp_path / "prep" / "data"
    common = [data, "--ckpt", tiny_ckpt_dir, "--lora", 2, "--max-steps", 3, "--holdout", 0, "--ema-decay", 0,
              "--lr", 1e-3, "--warmup-steps", 1, "--checkpoint-every", 3, "--max-prefix", 4, "--skip-visqol", "-q"]
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = launcher + ["--standalone", "--nproc-per-node", "2", "-m", "mucodec.train", "-o", str(tmp_path / "ddp"),
                      "--batch-size", "1"] + [str(a) for a in common]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert train.main([str(a) for a in common] + ["-o", str(tmp_path / "one"), "--batch-size", "2"]) == 0

    a, b = (train_state.load(tmp_path / r / "state/last.pt") for r in ("ddp", "one"))
    assert a["step"] == b["step"] == 3 and a["position"] == b["position"] == 6
    assert a["weights"].keys() == b["weights"].keys() and all(lora.is_adapter(n) for n in a["weights"])
    for n in a["weights"]:
        assert torch.allclose(a["weights"][n], b["weights"][n], rtol=0, atol=1e-6), n
    assert any(n.endswith("lora_B") and a["weights"][n].abs().sum() > 0 for n in a["weights"])  # it trained
    base = state_dict_of(read_checkpoint(resolve_files(tiny_ckpt_dir)["mucodec"], "mucodec"))
    tuned = state_dict_of(read_checkpoint(tmp_path / "ddp/ckpt/mucodec.pt", "mucodec"))
    changed = {k for k in base if not torch.equal(tuned[k], base[k])}
    blocks = len(MuCodec.from_pretrained(tiny_ckpt_dir).flow.estimator.transformer_blocks)
    assert len(changed) == len(lora.TARGETS) * blocks
