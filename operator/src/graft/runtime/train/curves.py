"""TensorBoard event files next to the checkpoints: loss, learning rate, tokens/s, evaluation.

Rank 0 writes them with ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard``
package, in the train extra) to ``<checkpoint dir>/tensorboard``, so they live on the same
volume as the checkpoints and survive pod restarts; a resumed run appends to the same
directory. With checkpoints in object storage the events are written to the work directory
and copied to ``<checkpoint uri>/tensorboard`` after each stage and at the end.

The x axis is the optimizer step counted across stages (a stage's steps follow the previous
stage's), so continued pre-training and SFT read as one curve; each stage's start is
recorded as text. Training loss is written for every step, from the losses the loop already
moves to the host at each progress report (no extra device sync per step).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from graft.runtime.train.config import Location

log = logging.getLogger(__name__)

SUBDIR = "tensorboard"


def curves_dir(checkpoint: Location, workdir: Path) -> Path:
    return Path(checkpoint.path) / SUBDIR if checkpoint.local else workdir / SUBDIR


class Curves:
    """One run's TensorBoard writer (rank 0; other ranks get ``enabled=False``)."""

    def __init__(self, checkpoint: Location, workdir: Path, *, enabled: bool) -> None:
        self.checkpoint = checkpoint
        self.dir = curves_dir(checkpoint, workdir)
        self.offset = 0
        self.written = 0
        self.writer: Any = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.dir), flush_secs=30)
        log.info("tensorboard event files", extra={"dir": str(self.dir)})

    def start_stage(self, name: str, index: int, offset: int, start: int) -> None:
        """``offset``: steps of the stages before this one; ``start``: resumed step."""
        self.offset = offset
        self.written = start
        if self.writer is not None:
            self.writer.add_text(
                "stages", f"stage {index} `{name}` starts at step {offset}", offset
            )

    def losses(self, losses: list[float], start: int) -> None:
        """The host-side losses of the stage so far (``losses[i]`` is step start + i + 1)."""
        if self.writer is None:
            return
        for i in range(max(0, self.written - start), len(losses)):
            self.writer.add_scalar("train/loss", losses[i], self.offset + start + i + 1)
        self.written = start + len(losses)

    def scalars(self, step: int, **values: float | None) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"train/{name}", value, self.offset + step)

    def evaluation(self, step: int, figures: dict[str, Any]) -> None:
        """An evaluation's figures at global ``step`` (0: the baseline)."""
        if self.writer is None:
            return
        for key in ("loss", "perplexity", "score"):
            if isinstance(figures.get(key), int | float):
                self.writer.add_scalar(f"eval/{key}", figures[key], step)
        for d in figures.get("datasets") or []:
            for key in ("loss", "perplexity", "score"):
                if isinstance(d.get(key), int | float):
                    self.writer.add_scalar(f"eval/{d['name']}/{key}", d[key], step)
        self.writer.flush()

    def sync(self) -> None:
        """Flush, and copy the files to object storage when the checkpoints live there."""
        if self.writer is None:
            return
        self.writer.flush()
        if not self.checkpoint.local:
            fs = self.checkpoint.filesystem()
            dest = self.checkpoint.path.rstrip("/") + f"/{SUBDIR}/"
            fs.put(str(self.dir) + "/", dest, recursive=True)

    def close(self) -> None:
        if self.writer is not None:
            self.sync()
            self.writer.close()
            self.writer = None
