"""A fine-tuning run's metrics, in formats standard tools read: ``metrics.csv`` (one row per logged step),
``loss.png`` (when matplotlib is installed) and TensorBoard event files under ``tensorboard/`` (when the
``tensorboard`` package is installed: ``pip install -r requirements-train.txt``).
"""
from __future__ import annotations

from pathlib import Path

from . import files

METRICS_CSV = "metrics.csv"
PLOT = "loss.png"
EVENTS = "tensorboard"
COLUMNS = ("step", "loss", "lr", "grad_norm", "val_mel", "val_latent_l2", "val_visqol")
NO_TENSORBOARD = "TensorBoard events are not written: pip install -r requirements-train.txt to get them"


def fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def summary_writer(folder: Path):
    """torch's SummaryWriter on ``folder``, or None when the tensorboard package is missing (an extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


class MetricsLog:
    """The metrics of the run folder ``run``; :meth:`open` once the run resumed (it drops the CSV rows past the
    resumed step, written after the last checkpoint, so each step appears once)."""

    def __init__(self, run: Path):
        self.run, self.writer = Path(run), None

    @property
    def csv(self) -> Path:
        return self.run / METRICS_CSV

    def open(self, step: int, log) -> None:
        lines = files.read_lines(self.csv)
        if lines:
            kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split(b",")[0]) <= step]
            files.write_atomic(self.csv, b"".join(ln + b"\n" for ln in kept))
        self.writer = summary_writer(self.run / EVENTS)
        if self.writer is None:
            log(NO_TENSORBOARD)
        elif step:
            # TensorBoard shows the newest value of a step that a resumed run logs again
            self.writer.add_scalar("run/resumed_at", step, step)

    def write(self, row: dict) -> None:
        if not self.csv.exists():
            files.append_line(self.csv, (",".join(COLUMNS) + "\n").encode())
        files.append_line(self.csv, (",".join(fmt(row.get(c, "")) for c in COLUMNS) + "\n").encode())
        if self.writer is not None:
            for name in COLUMNS[1:]:
                if isinstance(row.get(name), (int, float)):
                    self.writer.add_scalar(("val/" if name.startswith("val_") else "train/") + name, row[name],
                                           row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def plot(self) -> None:
        """loss.png beside metrics.csv, when matplotlib is installed (an optional extra)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        rows = [ln.decode().split(",") for ln in files.read_lines(self.csv)[1:]]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([int(r[0]) for r in rows], [float(r[1]) for r in rows])
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching loss")
        with files.open_atomic(self.run / PLOT) as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
