#!/usr/bin/env python3
"""The GPU path measured by one command: the GPU tests, then every bench stage on full-size weights.

    python3 tools/gpu_check.py --out gpu-results/                     # on a machine with CUDA
    python3 tools/gpu_check.py --out gpu-results/ --wheels wheels/    # offline: missing packages from wheels/
    python3 tools/gpu_check.py --out check/ --device cpu --tiny       # the same steps on a CPU, tiny models

Expected (not measured) to take under 8 minutes on one H100/H200-class GPU for the tests and bench steps,
writing the weights included, and about 8 more for the training, sampler and server steps, which come
last. Needs no network: the synthetic full-size weights (5.5 GiB) are written once into --synthetic-dir
and reused, and missing packages come from --wheels (made where there is network with 'pip download
soundfile pytest starlette uvicorn prometheus_client httpx -d wheels/'). Every step writes its JSON into
--out as soon as it finishes, and summary.json is rewritten after each step, so a run killed at a time
limit still returns what it measured:

    tests.json, tests.xml   pytest tests/test_gpu.py: counts and the names of failures
    bench-bfloat16.json     tools/bench.py: gemm, dit_step and dit_row with the DiT in bfloat16
    bench-audioldm-bfloat16.json, bench-audioldm-float16.json
                            vae and vocoder with --audioldm-dtype bfloat16 and float16
    bench-float16.json      tools/bench.py with the DiT in float16 (the CUDA default): gemm, load, sound2code,
                            dit_step, dit_row, vae, vocoder; song (a 3-minute song at 20 steps: real-time factor,
                            peak CUDA memory); decode_b1, decode_b8 (the decode job, 8 one-minute songs)
    train-*.log             tools/train_step.py: one fine-tuning step of the whole decoder at batch 1 (bf16,
                            bf16 with rank-16 LoRA, float32 with activation checkpointing); its JSON (step
                            seconds, peak memory) is the step's "result" in summary.json
    sampler-error.csv, .png tools/sampler_error.py: each sampler's error against a fine solution of one
                            window, 2-50 DiT evaluations, latents and the mel distance of the audio
    serve-load.json         tools/serve_load.py: 8 concurrent clients of the HTTP server, time to first audio,
                            latency, throughput, batch fill, responses equal to their solo decodes
    summary.json            the machine, each step's status, seconds, log and numbers
    <step>.log              each step's output

Exit status 0 when every step succeeded, 1 when one failed, 2 when the run could not start.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What the run imports besides torch (module: pip name); a bare PyTorch image usually lacks soundfile and
# pytest, and torchaudio must match torch, so it is named here but best installed with torch.
NEEDED = {"numpy": "numpy", "torchaudio": "torchaudio", "soundfile": "soundfile", "tqdm": "tqdm", "pytest": "pytest",
          "starlette": "starlette", "uvicorn": "uvicorn", "prometheus_client": "prometheus_client", "httpx": "httpx"}

# One bench.py process per precision: the dtype is fixed when the model loads, and each further process
# would cost another start and load. The short bfloat16 one goes first, so that a run cut short at its
# time limit loses only the end of the decode stage, which comes last.
BENCH = {
    # dit_row: the unguided pass (half the batch), which --guidance 1 and the guidance interval use
    "bfloat16": ["--dtype", "bfloat16", "--stages", "gemm,dit_step,dit_row"],
    # the VAE and vocoder in half precision (--audioldm-dtype), never yet timed on a GPU
    "audioldm-bfloat16": ["--dtype", "bfloat16", "--audioldm-dtype", "bfloat16", "--stages", "vae,vocoder"],
    "audioldm-float16": ["--dtype", "float16", "--audioldm-dtype", "float16", "--stages", "vae,vocoder"],
    # one-minute songs (2 windows each) keep the decode stage near a minute while still filling a batch of 8
    "float16": ["--dtype", "float16", "--stages", "gemm,load,sound2code,dit_step,dit_row,vae,vocoder,song,decode",
                "--song-seconds", "180", "--steps", "20",
                "--decode-batches", "1,8", "--decode-songs", "8", "--decode-seconds", "60"],
}
# Measurements of the fine-tuning step, the samplers and the server on the same weights: (script, its
# arguments, what --tiny adds). Each train step is its own process, as tools/train_step.py measures one
# configuration per process (peak memory is the process's).
TOOLS = {
    "train-bfloat16": ("train_step.py", ["--bf16"], []),
    "train-lora16-bfloat16": ("train_step.py", ["--bf16", "--lora", "16"], []),
    "train-float32-checkpointed": ("train_step.py", ["--checkpoint-blocks"], []),
    # the error of every sampler against a fine solution of one full-size window (docs/sampling.md); --tiny
    # cuts the window to 64 frames, as the tiny vocoder over 14 whole windows was half the tiny run
    "sampler-error": ("sampler_error.py", ["--smooth-time", "8", "--audio"],
                      ["--evals", "2,4", "--reference", "heun:4", "--frames", "64", "--threads", "1"]),
    # the server under 8 concurrent clients, songs of 1 to 4 minutes, each response checked against its solo
    # decode (docs/serving.md); --tiny: two short songs, one step
    "serve-load": ("serve_load.py", ["--steps", "20", "--batch", "8", "--clients", "8", "--check",
                                     "--lengths", "6000,1500,3000,4500,6000,1500,3000,4500"],
                   ["--steps", "1", "--batch", "2", "--clients", "2", "--lengths", "300,600"]),
}
# --tiny: one window per song and one step, so the whole check runs on a CPU in about a minute; one
# thread, because tiny models gain nothing from more and a shared CPU loses to their waiting.
TINY = ["--gemm-size", "256", "--clip-seconds", "3", "--vocoder-frames", "256", "--song-seconds", "10",
        "--steps", "1", "--decode-batches", "1", "--decode-songs", "1", "--decode-seconds", "10", "--threads", "1"]


class Refusal(Exception):
    """The run cannot start; the message is one sentence."""


def check_device(device: str):
    try:
        import torch
    except ImportError:
        raise Refusal("PyTorch is not installed; install torch and torchaudio for this machine first.") from None
    if not device.startswith("cuda"):
        return
    with warnings.catch_warnings(record=True) as caught:  # a driver problem arrives as a warning: say it
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        why = (str(caught[0].message).strip().splitlines()[0] if caught else
               "this PyTorch was built without CUDA" if torch.version.cuda is None else "no GPU is visible")
        raise Refusal(f"CUDA is not available here ({why}); run this on a machine with a GPU, "
                      "or check the script with --device cpu --tiny.")


def unimportable() -> dict:
    out = {}
    for module in NEEDED:
        try:
            importlib.import_module(module)
        except (ImportError, OSError) as e:  # OSError: soundfile without its sndfile library
            out[module] = str(e)
    return out


def ensure_packages(wheels: str | None):
    if wheels is not None and not Path(wheels).is_dir():
        raise Refusal(f"--wheels {wheels} is not a folder.")
    missing = unimportable()
    if not missing:
        return
    names = ", ".join(missing)
    if wheels is None:
        raise Refusal(f"{names} cannot be imported here; on a machine with network run "
                      f"'pip download {' '.join(NEEDED[m] for m in missing)} -d wheels/', bring the folder "
                      "and pass --wheels wheels/.")
    print(f"installing {names} from {wheels} (no network)", flush=True)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels,
                          *(NEEDED[m] for m in missing)], capture_output=True, text=True)
    if pip.returncode:
        last = (pip.stderr.strip() or pip.stdout.strip() or "no output").splitlines()[-1]
        raise Refusal(f"pip could not install {names} from {wheels}: {last.rstrip('.')}.")
    importlib.invalidate_caches()
    still = unimportable()
    if still:
        raise Refusal(f"{', '.join(still)} still cannot be imported after installing from {wheels}: "
                      f"{next(iter(still.values()))}.")


class Run:
    """The --out folder: progress lines, one log per step, summary.json after every step."""

    def __init__(self, out: Path, args):
        import torch

        self.out, self.start = out, time.perf_counter()
        cuda = args.device.startswith("cuda")
        self.summary = dict(command=["tools/gpu_check.py", *sys.argv[1:]], device=args.device, tiny=args.tiny,
                            machine=dict(python=platform.python_version(), platform=platform.platform(),
                                         torch=torch.__version__, torch_cuda=torch.version.cuda,
                                         gpus=torch.cuda.device_count() if cuda else 0),
                            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=None, status="running", steps={})

    def say(self, text: str):
        print(f"[{time.perf_counter() - self.start:7.1f} s] {text}", flush=True)

    def record(self, name: str, entry: dict):
        self.summary["steps"][name] = entry
        self.summary["seconds"] = round(time.perf_counter() - self.start, 1)
        self.write("summary.json", self.summary)
        self.say(f"{name}: {entry['status']} in {entry['seconds']} s")

    def write(self, name: str, obj):
        from mucodec.files import write_atomic  # checked and fsynced, as every file the project writes

        write_atomic(self.out / name, (json.dumps(obj, indent=2) + "\n").encode())

    def stream(self, name: str, cmd: list) -> dict:
        """Run ``cmd`` with its output shown live and kept in <name>.log; the step's entry for the summary."""
        t = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        last = ""
        with open(self.out / f"{name}.log", "w") as log, subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                self.say(f"{name} | {line.rstrip()}")
                last = line.strip() or last
        entry = dict(status="ok" if proc.returncode == 0 else "failed", returncode=proc.returncode,
                     seconds=round(time.perf_counter() - t, 1), log=f"{name}.log")
        if proc.returncode:
            entry["error"] = last
        return entry


def junit_counts(path: Path) -> dict:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    n["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
    return n


def run_tests(run: Run):
    xml = run.out / "tests.xml"
    xml.unlink(missing_ok=True)
    entry = run.stream("tests", [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q",
                                 "-p", "no:cacheprovider", f"--junitxml={xml}"])
    if xml.exists():
        entry.update(junit_counts(xml))
    run.write("tests.json", entry)
    run.record("tests", entry)


def write_weights(run: Run, folder: Path, tiny: bool) -> Path | None:
    sys.path.insert(0, str(ROOT / "tests"))
    t = time.perf_counter()
    if tiny:
        from helpers import write_tiny_checkpoints as write
    else:
        from helpers import write_official_checkpoints as write
        run.say(f"weights: full-size synthetic checkpoints in {folder} (written once, 5.5 GiB)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write(folder)
    except OSError as e:  # a full disk, most likely: the bench steps cannot run without the weights
        run.record("weights", dict(status="failed", seconds=round(time.perf_counter() - t, 1), folder=str(folder),
                                   error=f"cannot write the weights into {folder}: {e.strerror or e}."))
        return None
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    run.record("weights", dict(status="ok", seconds=round(time.perf_counter() - t, 1), folder=str(folder),
                               gib=round(size / 2 ** 30, 2), tiny=tiny))
    return folder


def run_bench(run: Run, name: str, ckpt: Path, device: str, tiny: bool):
    result = run.out / f"bench-{name}.json"
    result.unlink(missing_ok=True)
    entry = run.stream(f"bench-{name}", [sys.executable, str(ROOT / "tools" / "bench.py"), "--ckpt", str(ckpt),
                                         "--device", device, "--json", str(result), *BENCH[name],
                                         *(TINY if tiny else [])])
    entry.update(json=result.name, stages=json.loads(result.read_text())["stages"] if result.exists() else {})
    run.record(name, entry)


def run_tool(run: Run, name: str, ckpt: Path, device: str, tiny: bool):
    script, extra, tiny_extra = TOOLS[name]
    cmd = [sys.executable, str(ROOT / "tools" / script), "--ckpt", str(ckpt), "--device", device, *extra]
    if script == "sampler_error.py":
        cmd += ["-o", str(run.out / name)]
    if script == "serve_load.py":
        cmd += ["--json", str(run.out / f"{name}.json")]
        (run.out / f"{name}.json").unlink(missing_ok=True)
    entry = run.stream(name, cmd + (tiny_extra if tiny else []))
    if script == "train_step.py" and entry["status"] == "ok":  # its last line is its JSON
        log = (run.out / entry["log"]).read_text().strip().splitlines()
        entry["result"] = json.loads(log[-1])
    if script == "sampler_error.py":
        entry["files"] = sorted(f.name for f in run.out.glob(f"{name}.*") if f.suffix in (".csv", ".png"))
    if script == "serve_load.py" and (run.out / f"{name}.json").exists():
        entry["result"] = json.loads((run.out / f"{name}.json").read_text())
    run.record(name, entry)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="folder for the JSON files and logs (created)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --tiny) to check the script")
    p.add_argument("--tiny", action="store_true", help="tiny models and lengths instead of full-size weights")
    p.add_argument("--wheels", default=None, help="folder of wheels to install missing packages from, offline")
    p.add_argument("--synthetic-dir", default=str(Path.home() / ".cache" / "mucodec" / "synthetic"),
                   help="where the full-size synthetic checkpoints are kept between runs")
    args = p.parse_args(argv)
    try:
        if not args.tiny and not args.device.startswith("cuda"):  # a full-size song takes hours on a CPU
            raise Refusal(f"--device {args.device} measures nothing useful with full-size weights; "
                          "use a CUDA device, or add --tiny to check the script there.")
        check_device(args.device)
        ensure_packages(args.wheels)
        sys.path.insert(0, str(ROOT))
        from mucodec.codec import pick_device
        from mucodec.errors import MuCodecError

        try:
            pick_device(args.device)
        except MuCodecError as e:
            raise Refusal(str(e)) from None
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Refusal(f"cannot create --out {out}: {e.strerror}.") from None
    except Refusal as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2

    run = Run(out, args)
    run.say(f"gpu_check on {args.device}{' with tiny models' if args.tiny else ''}; results in {out}")
    try:
        run_tests(run)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = write_weights(run, Path(tmp) if args.tiny else Path(args.synthetic_dir), args.tiny)
            for name in BENCH if ckpt else ():
                run_bench(run, name, ckpt, args.device, args.tiny)
            for name in TOOLS if ckpt else ():
                run_tool(run, name, ckpt, args.device, args.tiny)
    except MuCodecError as e:  # --out's disk full or failing: the files already written stay whole
        print(f"gpu_check: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        run.summary["status"] = "interrupted"
        run.write("summary.json", run.summary)
        print(f"gpu_check: interrupted; the finished steps are in {out}.", file=sys.stderr)
        return 130
    failed = [k for k, v in run.summary["steps"].items() if v["status"] != "ok"]
    run.summary["status"] = "failed" if failed else "ok"
    run.summary["seconds"] = round(time.perf_counter() - run.start, 1)
    run.write("summary.json", run.summary)
    run.say(f"{len(failed)} step(s) failed ({', '.join(failed)}); see their logs in {out}." if failed else
            f"all steps ok; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
