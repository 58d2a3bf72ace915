"""The settings dataclasses: built once, checked once, the same words from every entry point."""
import dataclasses
import json
import math

import numpy as np
import pytest

from fake_codec import fake  # noqa: F401  (every model here is the fake one: no weights needed)
from mucodec import api, cli, settings
from mucodec.errors import ArgumentError
from mucodec.settings import DecodingOptions, EncodingOptions, JobOptions, SettingError


@pytest.mark.parametrize("cls, field, bad", [
    (DecodingOptions, "num_steps", 0), (DecodingOptions, "num_steps", settings.MAX_STEPS + 1),
    (DecodingOptions, "num_steps", 2.5), (DecodingOptions, "num_steps", True),
    (DecodingOptions, "guidance_scale", 0.99), (DecodingOptions, "guidance_scale", math.nan),
    (DecodingOptions, "guidance_scale", math.inf), (DecodingOptions, "guidance_scale", "2"),
    (DecodingOptions, "seed", -1), (DecodingOptions, "seed", 2 ** 64),
    (DecodingOptions, "batch_size", 0), (DecodingOptions, "batch_size", settings.MAX_BATCH + 1),
    (EncodingOptions, "batch_size", 0), (EncodingOptions, "batch_size", settings.MAX_BATCH + 1),
    (JobOptions, "workers", -1), (JobOptions, "shard_size", 0), (JobOptions, "engine", "spark"),
    (JobOptions, "dtype", "float64"), (JobOptions, "audio_format", "mp3"), (JobOptions, "token_format", "csv"),
    (JobOptions, "shard", (3, 2)),
])
def test_each_bound_is_refused_in_one_sentence_naming_the_field(cls, field, bad):
    with pytest.raises(SettingError) as e:
        cls(**{field: bad})
    msg = str(e.value)
    assert isinstance(e.value, ArgumentError) and e.value.name == field
    assert msg.startswith(f"{field} ") and msg.endswith(".") and msg.count(". ") == 0 and repr(bad) in msg


@pytest.mark.parametrize("cls, field, edge", [
    (DecodingOptions, "num_steps", 1), (DecodingOptions, "num_steps", settings.MAX_STEPS),
    (DecodingOptions, "guidance_scale", 1), (DecodingOptions, "seed", 0), (DecodingOptions, "seed", 2 ** 64 - 1),
    (DecodingOptions, "batch_size", settings.MAX_BATCH), (EncodingOptions, "batch_size", 1),
    (JobOptions, "workers", 0), (JobOptions, "shard", (2, 2)),
])
def test_the_edges_of_each_range_are_accepted(cls, field, edge):
    assert getattr(cls(**{field: edge}), field) == edge


def test_values_are_normalised_once_and_the_object_is_frozen():
    o = DecodingOptions(num_steps=np.int64(7), guidance_scale=2, seed=np.uint64(3))
    assert (type(o.num_steps), type(o.guidance_scale), type(o.seed)) == (int, float, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.num_steps = 8
    import torch
    assert JobOptions(dtype=torch.bfloat16).dtype == "bfloat16"


def test_the_official_defaults_and_the_task_resolution():
    o = DecodingOptions()
    assert (o.num_steps, o.guidance_scale, o.seed, o.fast_vocoder) == (None, 1.5, None, True)
    assert o.for_task("code2sound").num_steps == 20 and o.for_task("sound2sound").num_steps == 50
    assert DecodingOptions(num_steps=3).for_task("sound2sound").num_steps == 3
    assert EncodingOptions().batch_size == 3
    with pytest.raises(ArgumentError):
        o.fingerprint()  # unresolved steps would record nothing useful


def test_the_fingerprint_is_asdict_without_the_speed_only_fields():
    o = DecodingOptions(num_steps=4, seed=9, batch_size=16)
    fp = o.fingerprint()
    assert fp == {k: v for k, v in dataclasses.asdict(o).items() if k != "batch_size"}
    assert fp == dataclasses.replace(o, batch_size=1).fingerprint()  # a resumed job may change its batch
    assert json.loads(json.dumps(fp)) == fp


def test_the_api_and_the_command_line_refuse_with_the_same_rule(tmp_path, capsys):
    with pytest.raises(SettingError) as e:
        api.code2sound([1, 2, 3], num_steps=0)
    rule = e.value.rule
    with pytest.raises(SystemExit) as x:
        cli.main([str(tmp_path / "x.wav"), "--steps", "0"])
    assert x.value.code == 2 and f"--steps {rule}" in capsys.readouterr().err
