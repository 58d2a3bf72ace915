"""tools/gpu_check.py: every step but the CUDA calls runs on a CPU with tiny models, and a run that cannot
start says why in one sentence."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.py"


def gpu_check(*args, hide=()):
    """Run the script in a fresh interpreter; ``hide`` makes those modules unimportable there."""
    code = ("import runpy, sys\n"
            f"for m in {list(hide)!r}: sys.modules[m] = None\n"
            f"sys.argv = ['gpu_check.py'] + {list(args)!r}\n"
            f"sys.exit(runpy.run_path({str(SCRIPT)!r}, run_name='__main__'))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)


def one_sentence(r) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: ") and lines[0].endswith("."), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    r = gpu_check("--device", "cpu", "--tiny", "--out", str(out))
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


@pytest.mark.slow  # the tiny run is about 150 s
def test_the_cpu_run_writes_every_step(tiny_run):
    summary = read(tiny_run, "summary.json")
    assert summary["status"] == "ok" and list(summary["steps"]) == [
        "tests", "weights", "bfloat16", "audioldm-bfloat16", "audioldm-float16", "float16",
        "train-bfloat16", "train-lora16-bfloat16", "train-float32-checkpointed", "sampler-error", "serve-load"]
    for name, step in summary["steps"].items():
        assert step["status"] == "ok" and step["seconds"] >= 0, name
        if "log" in step:
            assert (tiny_run / step["log"]).stat().st_size > 0

    tests = read(tiny_run, "tests.json")  # the GPU tests run where CUDA is, whatever --device says
    ran = "passed" if torch.cuda.is_available() else "skipped"
    assert tests["tests"] == tests[ran] > 0 and tests["failed_tests"] == []

    bf16, fp16 = read(tiny_run, "bench-bfloat16.json"), read(tiny_run, "bench-float16.json")
    assert bf16["dtype"] == "bfloat16" and set(bf16["stages"]) == {"gemm", "gemm_float32", "dit_step", "dit_row"}
    assert fp16["dtype"] == "float16" and set(fp16["stages"]) == {
        "gemm", "gemm_float32", "load", "sound2code", "dit_step", "dit_row", "vae", "vocoder", "song", "decode_b1"}
    halves = [read(tiny_run, f"bench-audioldm-{d}.json") for d in ("bfloat16", "float16")]
    for report, dtype in zip(halves, ("bfloat16", "float16")):
        assert report["audioldm_dtype"] == dtype and set(report["stages"]) == {"vae", "vocoder"}
    assert fp16["audioldm_dtype"] == "float32"
    for report, name in ((bf16, "bfloat16"), (halves[0], "audioldm-bfloat16"), (halves[1], "audioldm-float16"),
                         (fp16, "float16")):
        assert summary["steps"][name]["stages"] == report["stages"]
        for stage, r in report["stages"].items():
            assert math.isfinite(r["seconds"]) and r["seconds"] > 0, stage
    assert fp16["stages"]["dit_step"]["gflop"] > 0
    # half the rows, half the products (the report rounds GFLOP to 0.1)
    assert abs(fp16["stages"]["dit_row"]["gflop"] - fp16["stages"]["dit_step"]["gflop"] / 2) <= 0.08
    assert fp16["stages"]["song"]["real_time_factor"] > 0
    decode = fp16["stages"]["decode_b1"]
    assert decode["songs"] == 1 and decode["windows"] == 1 and decode["hours_per_hour"] > 0

    # the fine-tuning steps train the checkpoint's own decoder: the tiny one's single block, as configured
    steps = summary["steps"]
    bf16, lora16 = steps["train-bfloat16"]["result"], steps["train-lora16-bfloat16"]["result"]
    fp32 = steps["train-float32-checkpointed"]["result"]
    assert (bf16["bf16"], lora16["lora"], fp32["checkpoint_blocks"], fp32["bf16"]) == (True, 16, True, False)
    assert bf16["dit_blocks"] == 1 and all(r["step_seconds"] > 0 and r["peak_mib"] > 0 for r in (bf16, fp32))
    assert 0 < lora16["trained_parameters"] < bf16["trained_parameters"] == fp32["trained_parameters"]
    assert steps["sampler-error"]["files"] == ["sampler-error.csv", "sampler-error.png"]
    rows = (tiny_run / "sampler-error.csv").read_text().splitlines()
    assert rows[0].startswith("weights,sampler,evaluations") and len(rows) > 1
    load = steps["serve-load"]["result"]
    assert load == read(tiny_run, "serve-load.json") and load["equal_to_solo"] == 2 and load["lengths"] == [300, 600]
    assert 0 < load["first_audio_p50"] <= load["total_p50"] and load["hours_per_hour"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_without_cuda_the_refusal_is_one_sentence(tmp_path):
    line = one_sentence(gpu_check("--out", str(tmp_path / "out")))
    assert "CUDA is not available" in line and "--device cpu --tiny" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("wheels", [False, True])
def test_a_missing_package_is_one_sentence(tmp_path, wheels):
    extra = ["--wheels", str(tmp_path)] if wheels else []  # an empty folder: nothing to install from
    line = one_sentence(gpu_check("--device", "cpu", "--tiny", "--out", str(tmp_path / "out"), *extra,
                                  hide=["soundfile"]))
    assert "soundfile" in line and ("--wheels" in line if not wheels else str(tmp_path) in line)
    assert not (tmp_path / "out").exists()


def test_a_failing_write_into_out_is_one_sentence(tmp_path):
    """A full disk under --out stops the run with the writer's own sentence, not a traceback."""
    code = ("import runpy, sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from mucodec import files\n"
            "from mucodec.errors import StorageError\n"
            "def full(path, data, **kw):\n"
            "    raise StorageError(f'Cannot write {path}: no space left on device; free space and run again.')\n"
            "files.write_atomic = full\n"
            f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--tiny', '--out', {str(tmp_path / 'out')!r}]\n"
            f"sys.exit(runpy.run_path({str(SCRIPT)!r}, run_name='__main__'))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        f"gpu_check: Cannot write {tmp_path / 'out' / 'tests.json'}: no space left on device; free space and run again."]
    assert not (tmp_path / "out" / "summary.json").exists()
