"""tools/compare.py: rows and composed windows go by the precision each stage ran in."""
import json
import runpy
from pathlib import Path

from mucodec.vocoder import VocoderConfig

ROOT = Path(__file__).resolve().parent.parent
compare = runpy.run_path(str(ROOT / "tools" / "compare.py"), run_name="compare")


def write(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def stage(seconds: float, **kw) -> dict:
    return dict(seconds=seconds, rss_before_gib=1.0, rss_peak_gib=2.0, **kw)


def test_composed_windows_per_precision_pair(tmp_path):
    full = 4096 * VocoderConfig().hop_length  # a whole window of vocoder output: no scaling
    item = lambda name, s, **kw: dict(name=name, seconds=s, rss_increase_gib=1.0, **kw)  # noqa: E731
    official = write(tmp_path / "o.json", {"items": [
        item("dit_cfg_forward", 10.0), item("vae_decode_window", 6.0),
        item("vocoder_chunk_infer", 8.0, wav_shape=[2, full])]})
    fp32 = write(tmp_path / "a.json", {"dtype": "float32", "stages": {
        "dit_step": stage(5.0), "vae": stage(4.0), "vocoder": stage(4.0)}})
    # written before --audioldm-dtype existed: its stages are the DiT's precision, the VAE would be float32
    bf16_dit = write(tmp_path / "b.json", {"dtype": "bfloat16", "stages": {"dit_step": stage(2.0)}})
    bf16_all = write(tmp_path / "c.json", {"dtype": "bfloat16", "audioldm_dtype": "bfloat16", "stages": {
        "vae": stage(2.0), "vocoder": stage(2.0)}})
    out = compare["main"]([official, fp32, bf16_dit, bf16_all, "--steps", "2"])
    # official 2 x 10 + 6 + 8 = 34 s; by hand for each pair of precisions
    assert "official float32 34 s" in out
    assert "this repo with the DiT in float32 18 s (1.89x)" in out                            # 10 + 4 + 4
    assert "this repo with the DiT in float32 and the VAE and vocoder in bfloat16 14 s (2.43x)" in out  # 10 + 2 + 2
    assert "this repo with the DiT in bfloat16 12 s (2.83x)" in out                           # 4 + 4 + 4
    assert "this repo with the DiT in bfloat16 and the VAE and vocoder in bfloat16 8 s (4.25x)" in out  # 4 + 2 + 2
    rows = [r for r in out.splitlines() if r.startswith("| VAE decode")]
    assert [r.split(" | ")[1] for r in rows] == ["float32", "bfloat16"]
    assert "| 6.0 | 2.0 | 3.00x |" in rows[1]
