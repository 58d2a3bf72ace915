"""Training on a prepared folder larger than memory: mucodec/library/windows.py's ShardStream reads a few
shards at a time, on the tiny models."""
from __future__ import annotations

import pytest
import torch

from mucodec import train, train_state
from mucodec.checkpoint import resolve_files
from mucodec.codec import MuCodec
from mucodec.errors import ArgumentError
from mucodec.library.windows import ShardStream, held_out_windows, load_windows
from mucodec.trainer import Trainer
from test_training import fit_killed_after_first_checkpoint, options, write_music

SONGS = 6


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_ckpt_dir):
    """A folder of 6 songs of one window each, prepared one song per shard."""
    pytest.importorskip("pyarrow")
    tmp = tmp_path_factory.mktemp("stream")
    music = write_music(tmp / "music", [(f"s{k}.wav", 1.0 + k / 4) for k in range(SONGS)])
    argv = [music, "-o", tmp / "prep", "--ckpt", tiny_ckpt_dir, "--workers", 0, "--shard", "1/1",
            "--shard-songs", 1, "--encode-batch-size", 1, "-q"]
    assert train.main([str(a) for a in argv]) == 0
    return tmp / "prep" / "data"


def key(codes: torch.Tensor) -> bytes:
    return codes.numpy().tobytes()


def test_an_epoch_reads_every_window_once_holding_one_group_of_shards(prepared):
    whole, _ = load_windows(prepared, holdout=0.0)
    by_codes = {key(whole.codes[i]): i for i in range(len(whole))}
    assert len(whole) == len(by_codes) == SONGS
    stream = ShardStream(prepared, holdout=0.0, buffer=2)
    assert len(stream) == SONGS and len(stream.shards) == SONGS
    epochs = []
    for epoch in range(2):
        seen = []
        for p in range(epoch * SONGS, (epoch + 1) * SONGS):
            codes, latents, valid = stream.batch(p, 1, seed=5)
            i = by_codes[key(codes[0])]
            assert torch.equal(latents[0], whole.latents[i].float()) and int(valid[0]) == int(whole.valid[i])
            seen.append(i)
        assert sorted(seen) == list(range(SONGS))  # each window once per epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new order every epoch
    assert stream.loads == 2 * SONGS // 2  # read in order, each group of 2 shards is read once per epoch

    # the order is a function of seed and position alone: a fresh stream (a resumed run) reads the same, and a
    # batch across the end of an epoch is the windows of its positions
    fresh = ShardStream(prepared, holdout=0.0, buffer=2)
    codes, _, _ = fresh.batch(SONGS - 2, 4, seed=5)
    assert [by_codes[key(c)] for c in codes] == epochs[0][-2:] + epochs[1][:2]
    other, _, _ = ShardStream(prepared, holdout=0.0, buffer=2).batch(0, SONGS, seed=6)
    assert [by_codes[key(c)] for c in other] != epochs[0]


def test_a_group_is_the_only_data_in_memory(prepared):
    stream = ShardStream(prepared, holdout=0.0, buffer=3)
    stream.batch(0, 1, seed=0)
    group = stream._group[1]
    assert len(group) == 3  # 3 shards of one window each; the other 3 are not read
    stream.batch(SONGS - 1, 1, seed=0)
    assert stream.loads == 2 and len(stream._group[1]) == 3


def test_held_out_songs_are_left_out_and_validate_in_the_folder_order(prepared):
    train_w, held = load_windows(prepared, holdout=0.5)
    assert train_w is not None and held is not None  # this folder's ids split both ways at 0.5
    stream = ShardStream(prepared, holdout=0.5, buffer=2)
    assert len(stream) == len(train_w)
    streamed = {key(stream.batch(p, 1, seed=0)[0][0]) for p in range(len(stream))}
    assert streamed == {key(c) for c in train_w.codes}
    first = held_out_windows(prepared, holdout=0.5, limit=1)
    assert len(first) == 1 and torch.equal(first.codes, held.codes[:1]) and torch.equal(first.latents, held.latents[:1])
    every = held_out_windows(prepared, holdout=0.5)
    assert torch.equal(every.codes, held.codes) and torch.equal(every.valid, held.valid)
    assert held_out_windows(prepared, holdout=0.0) is None
    with pytest.raises(ArgumentError, match="buffer"):
        ShardStream(prepared, buffer=0)


def test_a_streamed_run_resumes_bit_for_bit(prepared, tiny_ckpt_dir, tmp_path, monkeypatch):
    files = resolve_files(tiny_ckpt_dir)
    opts = options(max_steps=4, batch_size=2, stream_shards=2, checkpoint_every=2, validate_every=2)
    data = lambda: (ShardStream(prepared, 0.5, 2), held_out_windows(prepared, 0.5, opts.val_windows))  # noqa: E731
    Trainer(MuCodec.from_pretrained(tiny_ckpt_dir), *data(), tmp_path / "a", opts, files, log=lambda m: None).fit()
    fit_killed_after_first_checkpoint(monkeypatch, Trainer(MuCodec.from_pretrained(tiny_ckpt_dir), *data(),
                                                           tmp_path / "b", opts, files, log=lambda m: None).fit)
    assert train_state.load(tmp_path / "b/state/last.pt")["step"] == 2
    Trainer(MuCodec.from_pretrained(tiny_ckpt_dir), *data(), tmp_path / "b", opts, files, log=lambda m: None).fit()
    a, b = (train_state.load(tmp_path / r / "state/last.pt") for r in "ab")
    assert a["position"] == b["position"] == 8
    for k in ("weights", "ema"):
        assert all(torch.equal(a[k][n], b[k][n]) for n in a[k])


def test_the_command_line_streams_with_stream_shards(prepared, tiny_ckpt_dir, tmp_path):
    import json

    run = tmp_path / "run"
    argv = [prepared, "-o", run, "--ckpt", tiny_ckpt_dir, "--max-steps", 2, "--stream-shards", 2, "--holdout", 0.5,
            "--val-windows", 1, "--validate-every", 2, "--max-prefix", 4, "--skip-visqol", "-q"]
    assert train.main([str(a) for a in argv]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["stream_shards"] == 2 and config["validation_windows"] == 1
    assert MuCodec.from_pretrained(run).flow is not None
    assert train.main([str(a) for a in argv[:-2]] + ["--stream-shards", "3", "--skip-visqol", "-q"]) == 2  # refused
