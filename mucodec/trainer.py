"""The fine-tuning loop: AdamW with warm-up and cosine decay, gradient clipping and accumulation, bf16
autocast over float32 master weights, an EMA of the weights, atomic checkpoints with exact resume, a stop
on a non-finite loss, validation by mel distance with the best weights kept, and the run folder as an
official-layout checkpoint (:mod:`train_state`). The objective is :mod:`training`'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import files, lora, metrics, train_state
from .errors import ArgumentError, NumericalError
from .settings import GUIDANCE_SCALE, DecodingOptions
from .train_log import MetricsLog, fmt
from .training import SEED_STRIDE, TRAINABLE, Draws, Objective, Windows, cfm_loss, draw, set_trainable


@dataclass(frozen=True)
class TrainOptions:
    """Settings of a run (saved in its state and model card; a resumed run must use the same)."""

    max_steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    min_lr_ratio: float = 0.1    # the cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    clip_norm: float = 1.0       # 0: no clipping
    ema_decay: float = 0.999     # 0: no EMA (the exported weights are then the trained ones)
    bf16: bool = False           # bf16 autocast; weights, gradients and optimiser state stay float32
    checkpoint_blocks: bool = False  # activation checkpointing: recompute each DiT block in the backward pass
    cond_drop: float = 0.1
    max_prefix: int = 128
    checkpoint_every: int = 100
    validate_every: int = 100
    val_steps: int = 10          # Euler steps of the validation decode
    val_windows: int = 16        # held-out windows decoded per validation (the first ones, always the same)
    val_guidance: float = GUIDANCE_SCALE
    log_every: int = 10
    seed: int = 0
    lora: int = 0                # rank of the LoRA adapters (0: full fine-tuning of the TRAINABLE parts)
    lora_alpha: float = 16.0     # the adapters' scale is lora_alpha / lora (peft's convention)
    skip_visqol: bool = False    # validation scores ViSQOL too when the eval extra is installed, unless set
    stream_shards: int = 0       # 0: every window in memory; N: read N shards at a time (library.windows)

    def __post_init__(self):
        counts = ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "validate_every", "val_windows",
                  "log_every")
        for name in counts:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ArgumentError(f"{name} must be a whole number >= 1, got {v!r}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ArgumentError(f"lr must be a positive number, got {self.lr!r}.")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.ema_decay < 1:
            raise ArgumentError("min_lr_ratio must lie in [0, 1] and ema_decay in [0, 1).")
        if isinstance(self.lora, bool) or not isinstance(self.lora, int) or self.lora < 0:
            raise ArgumentError(f"lora (the adapters' rank) must be a whole number >= 0, got {self.lora!r}.")
        if isinstance(self.stream_shards, bool) or not isinstance(self.stream_shards, int) or self.stream_shards < 0:
            raise ArgumentError(f"stream_shards must be a whole number >= 0, got {self.stream_shards!r}.")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ArgumentError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.clip_norm < 0:
            raise ArgumentError("warmup_steps, weight_decay and clip_norm must be >= 0.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ArgumentError(f"betas must be two numbers in [0, 1), got {self.betas!r}.")
        Objective(self.cond_drop, self.max_prefix)  # its own checks
        DecodingOptions(num_steps=self.val_steps, guidance_scale=self.val_guidance)  # checked as every decode's

    @property
    def validation(self) -> DecodingOptions:
        """The validation decode's options."""
        return DecodingOptions(num_steps=self.val_steps, guidance_scale=self.val_guidance)

    @property
    def objective(self) -> Objective:
        return Objective(self.cond_drop, self.max_prefix)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up from 0 over warmup_steps, then a cosine from 1 down to min_lr_ratio at max_steps."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.max_steps - self.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.warmup_steps) / span)))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cos


class _Loss(nn.Module):
    """The objective as a module, so that DistributedDataParallel can wrap it and average its gradients."""

    def __init__(self, flow, objective: Objective):
        super().__init__()
        self.flow, self.objective = flow, objective

    def forward(self, z_q, latents, valid, t, noise, prefix, dropped):
        return cfm_loss(self.flow, z_q, latents, valid, Draws(t, noise, prefix, dropped), self.objective)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the process group torchrun set up, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """One run: ``codec`` (a float32 :class:`MuCodec` with its decoder) is trained in place on ``train`` (windows
    in memory or a :class:`library.windows.ShardStream`);
    ``val`` (or None) is decoded every ``validate_every`` steps. Resumes from ``run``/state/last.pt."""

    def __init__(self, codec, train: Windows, val: Windows | None, run, opts: TrainOptions, base_files: dict,
                 fingerprint: dict | None = None, log=print):
        if codec.flow is None or codec.dtype != torch.float32:
            raise ArgumentError("Fine-tuning needs the decoder loaded in float32 (use bf16=True for autocast).")
        if len(train) == 0:
            raise ArgumentError("The training set holds no windows; prepare a folder with music first.")
        self.codec, self.train, self.val, self.opts, self.log = codec, train, val, opts, log
        self.run, self.base_files, self.fingerprint = Path(run), base_files, fingerprint or {}
        self.flow = codec.flow
        self.names = set_trainable(codec, TRAINABLE)
        if opts.lora:  # only the adapters train; the export merges them into plain weights
            self.names = lora.attach(self.flow, opts.lora, opts.lora_alpha, opts.seed)
        self.flow.estimator.checkpoint_blocks = opts.checkpoint_blocks
        self.params = {n: p for n, p in self.flow.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=opts.lr, betas=tuple(opts.betas),
                                           weight_decay=opts.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, opts.lr_factor)
        self.ema = {n: p.detach().clone() for n, p in self.params.items()} if opts.ema_decay else None
        self.generator = torch.Generator().manual_seed(opts.seed)
        # one process per device: each computes its part of every batch, DDP averages the gradients, and
        # rank 0 alone writes files and validates
        self.rank, self.world = _distributed()
        self.loss_fn = _Loss(self.flow, opts.objective)
        if self.world > 1:
            ids = [codec.device.index or 0] if codec.device.type == "cuda" else None
            # the statistics buffers never change: nothing to broadcast at every step
            self.loss_fn = nn.parallel.DistributedDataParallel(self.loss_fn, device_ids=ids, broadcast_buffers=False)
        self.step = self.position = 0
        self.best = math.inf
        self.last_val: dict = {}
        self.val_audio: dict = {}
        self.metrics = MetricsLog(self.run)
        self.visqol = not opts.skip_visqol and importlib.util.find_spec("visqol") is not None
        self.state_dir = self.run / train_state.STATE_DIR
        if (self.state_dir / train_state.LAST).exists():
            self.resume(train_state.load(self.state_dir / train_state.LAST))

    # ---- state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "position": self.position, "best": self.best, "last_val": self.last_val,
                "options": dataclasses.asdict(self.opts),
                "weights": {n: p.detach().clone() for n, p in self.params.items()},
                "ema": self.ema, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}

    def resume(self, st: dict) -> None:
        # a setting added since the run started had its default then (runs of earlier versions resume)
        saved = {**dataclasses.asdict(TrainOptions()), **st["options"]}
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
        if saved != {k: tuple(v) if isinstance(v, list) else v for k, v in dataclasses.asdict(self.opts).items()}:
            raise ArgumentError(f"{self.run} was started with other settings; use the same ones to resume it, "
                                f"or another output folder.")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(st["weights"][n])
        self.ema = st["ema"]
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.generator.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        self.step, self.position, self.best, self.last_val = st["step"], st["position"], st["best"], st["last_val"]
        self.log(f"resumed {self.run} at step {self.step}")

    def exported_weights(self) -> dict:
        """The trained tensors as the run exports them: the EMA's or the current ones (adapters under LoRA)."""
        return self.ema if self.ema is not None else {n: p.detach() for n, p in self.params.items()}

    def plain_weights(self, weights: dict) -> dict:
        """``weights`` as tensors of the official mucodec.pt (FlowDecoder names): adapters merged."""
        return lora.merged(self.flow, weights) if self.opts.lora else weights

    # ---- one optimiser step ---------------------------------------------------------------------
    def micro_step(self) -> float:
        size, dev = self.opts.batch_size, self.codec.device
        codes, latents, valid = self.train.batch(self.position + self.rank * size, size, self.opts.seed)
        self.position += size * self.world
        # every process draws the whole batch's randomness and takes its part: any number of processes
        # sees what one process with the whole batch would
        d = draw(self.opts.objective, (size * self.world,) + tuple(latents.shape[1:]), self.generator)
        part = slice(self.rank * size, (self.rank + 1) * size)
        with torch.no_grad():
            z_q, _ = self.codec.quantizer.from_codes(codes.to(dev))
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if self.opts.bf16 else contextlib.nullcontext()
        with amp:
            loss = self.loss_fn(z_q, latents.to(dev), valid, d.t[part], d.noise[part].to(dev), d.prefix[part],
                                d.dropped[part])
        seen = loss.detach().clone()
        if self.world > 1:  # every process must see a NaN of any, or the others would wait for it forever
            dist.all_reduce(seen)
            seen /= self.world
        self.check_finite(seen, "loss")
        (loss / self.opts.grad_accum).backward()
        return float(seen)

    def train_step(self) -> dict:
        loss = sum(self.micro_step() for _ in range(self.opts.grad_accum)) / self.opts.grad_accum
        params = list(self.params.values())
        if self.opts.clip_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.opts.clip_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        self.check_finite(torch.tensor(norm), "gradient norm")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self.params.items():
                    self.ema[n].lerp_(p.detach(), 1 - self.opts.ema_decay)
        self.step += 1
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm}

    def check_finite(self, x: torch.Tensor, what: str) -> None:
        if not bool(torch.isfinite(x).all()):
            last = self.state_dir / train_state.LAST
            kept = f"its last good checkpoint {last} is intact" if last.exists() else "no checkpoint was written yet"
            value = float(x.detach().float().sum())
            raise NumericalError(f"The training {what} became {value} at step {self.step + 1}, so the run stopped "
                                 f"and {kept}; lower the learning rate or check the data.")

    # ---- the run --------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``max_steps`` (from where the last state left off); returns the model card (rank 0; the other
        processes of a distributed run return an empty dict)."""
        opts, lead = self.opts, self.rank == 0
        if lead:
            self.run.mkdir(parents=True, exist_ok=True)
            self.metrics.open(self.step, self.log)
        bar = tqdm(total=opts.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not (lead and sys.stderr.isatty()))
        start = time.perf_counter()
        try:
            self.loop(bar, start)
        finally:
            bar.close()
            self.metrics.close()
        return self.finish() if lead else {}

    def loop(self, bar, start: float) -> None:
        opts, lead = self.opts, self.rank == 0
        while self.step < opts.max_steps:
            row = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if not lead:
                continue
            last = self.step == opts.max_steps
            if self.val is not None and (self.step % opts.validate_every == 0 or last):
                row.update(self.validate())
            if self.step % opts.log_every == 0 or last or "val_mel" in row:
                self.metrics.write(row)
                if bar.disable:
                    took = time.perf_counter() - start
                    self.log(" ".join(f"{k}={fmt(v)}" for k, v in row.items()) + f" ({took:.1f} s)")
            if self.step % opts.checkpoint_every == 0 or last:
                train_state.save(self.state_dir / train_state.LAST, self.state())

    def validate(self) -> dict:
        """Decode every held-out window from fixed noise with the weights that would be exported; the mean
        multi-scale mel distance of its audio to the audio of the window's own VAE latents (the best the frozen
        stages allow), the relative L2 distance of the latents, and ViSQOL of the audio when the eval extra is
        installed. Keeps the best weights by mel distance."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        scores = []
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.exported_weights()[n])
            for i in range(min(len(self.val), self.opts.val_windows)):
                scores.append(self.score_window(i))
            for n, p in self.params.items():
                p.copy_(saved[n])
        # ViSQOL is missing for windows too short for it: each figure is the mean of the windows that have it
        names = dict.fromkeys(k for s in scores for k in s)
        self.last_val = {k: sum(s[k] for s in scores if k in s) / sum(k in s for s in scores) for k in names}
        if self.last_val["val_mel"] < self.best:
            self.best = self.last_val["val_mel"]
            train_state.save(self.state_dir / train_state.BEST,
                             {"step": self.step, **self.last_val, "weights": self.exported_weights()})
        return dict(self.last_val)

    def score_window(self, i: int) -> dict:
        codes, true, valid = self.val.codes[i:i + 1], self.val.latents[i:i + 1].float(), int(self.val.valid[i])
        noise = torch.randn(true.shape, generator=torch.Generator().manual_seed(self.opts.seed * SEED_STRIDE + i))
        got = self.codec.decode_window(codes, true, 0, noise, self.opts.validation)[:, :, :valid]
        ref = true[:, :, :valid]
        if i not in self.val_audio:  # the frozen stages' audio of a window never changes: made once
            self.val_audio[i] = self.codec.latents_to_wave(ref)
        wav = self.codec.latents_to_wave(got)
        out = {"val_mel": metrics.mel_distance(self.val_audio[i], wav),
               "val_latent_l2": float((got - ref).norm() / ref.norm().clamp(min=1e-12))}
        if self.visqol:
            try:
                out["val_visqol"] = metrics.visqol(self.val_audio[i], wav)
            except ValueError:  # under about a second of audio: too short for one ViSQOL patch
                pass
        return out

    def finish(self) -> dict:
        best = self.state_dir / train_state.BEST
        weights, chosen = self.exported_weights(), "last"
        if self.val is not None and best.exists():
            weights, chosen = train_state.load(best)["weights"], "best"
        path = train_state.export(self.base_files, self.plain_weights(weights), self.run)
        trained = sorted({n.split(lora.ADAPTER)[0] + ".weight" for n in self.names} if self.opts.lora else self.names)
        card = {"base_checkpoint_sha256": files.sha256(self.base_files["mucodec"]), "data": self.fingerprint,
                "steps": self.step, "exported": chosen + (" (EMA)" if self.ema is not None else "")
                + (f" (LoRA rank {self.opts.lora} merged)" if self.opts.lora else ""),
                "trained": trained, "settings": dataclasses.asdict(self.opts),
                "validation": self.last_val, "best_val_mel": None if math.isinf(self.best) else self.best}
        files.write_atomic(self.run / train_state.CARD, (json.dumps(card, indent=2) + "\n").encode())
        self.metrics.plot()
        self.log(f"wrote {path}")
        return card


def fit_folder(data, run, *, ckpt=None, revision=None, device="cpu", opts: TrainOptions = TrainOptions(),
               holdout: float | None = None, log=print) -> dict:
    """Fine-tune the decoder of ``ckpt`` on a prepared folder ``data`` into the run folder ``run``
    (resuming it); returns the model card. The settings are printed and saved as ``run``/config.json."""
    from .checkpoint import default_checkpoint, resolve_files
    from .codec import MuCodec
    from .library.prepare import HOLDOUT
    from .library.windows import ShardStream, held_out_windows, load_windows

    ckpt = ckpt if ckpt is not None else default_checkpoint()
    base_files = resolve_files(ckpt, ("audioldm", "muq", "mucodec"), revision)
    if Path(run).resolve() in {Path(p).resolve().parent.parent for p in base_files.values()}:
        raise ArgumentError(f"The run folder {run} is the starting checkpoint's folder; write the run elsewhere.")
    holdout = HOLDOUT if holdout is None else holdout
    if opts.stream_shards:
        train, val = ShardStream(data, holdout, opts.stream_shards), held_out_windows(data, holdout, opts.val_windows)
    else:
        train, val = load_windows(data, holdout)
    if train is None or len(train) == 0:
        raise ArgumentError(f"Every song of {data} is held out; lower the held-out fraction.")
    config = {"data": str(data), "ckpt": str(ckpt), "device": str(device), "holdout": holdout,
              "training_windows": len(train), "validation_windows": 0 if val is None else len(val),
              "options": dataclasses.asdict(opts)}
    device = _join_torchrun(device)
    if _distributed()[0] == 0:
        log(json.dumps(config, indent=2))
        Path(run).mkdir(parents=True, exist_ok=True)
        files.write_atomic(Path(run) / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    fp_path = Path(data) / "fingerprint.json"
    fingerprint = {"sha256": files.sha256(fp_path), "windows": len(train) + (0 if val is None else len(val))}
    codec = MuCodec.from_pretrained(ckpt, device=device, revision=revision, decoder_only=True)
    return Trainer(codec, train, val, run, opts, base_files, fingerprint, log).fit()


def _join_torchrun(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1): join its process group (NCCL on GPUs, gloo on CPUs) and return this
    process's device (cuda:LOCAL_RANK on GPUs); else ``device`` unchanged."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device
