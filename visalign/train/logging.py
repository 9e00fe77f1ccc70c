"""Run logs: JSONL metrics always, TensorBoard when installed, wandb when asked; image grids as PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from visalign.media import make_grid, save_image, save_video


class RunLogger:
    """Writes ``metrics.jsonl`` (one object per iteration, flushed) and mirrors scalars to the backends."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, wandb: bool = False,
                 config: dict[str, Any] | None = None, wandb_init: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional ([plots]/[dev] extras); JSONL always works
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise ImportError("run.wandb is true but wandb is not installed: pip install wandb, or set "
                                  "run.wandb=false.") from None
            self._wandb = wandb_module.init(dir=str(self.run_dir), config=config or {}, **(wandb_init or {}))
            self._wandb_image = wandb_module.Image

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def grid(self, step: int, media: torch.Tensor, columns: int, tag: str = "eval") -> Path:
        """Save a grid of the samples to ``grids/{tag}-{step:06d}.png``; videos also as an animated GIF of per-frame
        grids (``.gif`` beside it), so motion can be checked, not only the first frame.

        Args:
            media: float in [0, 1], images ``[N, 3, H, W]`` or videos ``[N, T, 3, H, W]``.
            columns: samples per grid row.

        Returns:
            The PNG path (first frame for videos).
        """
        folder = self.run_dir / "grids"
        folder.mkdir(exist_ok=True)
        path = folder / f"{tag}-{step:06d}.png"
        media = media.detach().float().cpu()
        if media.ndim == 5:
            frames = torch.stack([make_grid(media[:, t], columns=columns) for t in range(media.shape[1])])
            save_video(frames, path.with_suffix(".gif"))
            grid = frames[0]
        else:
            grid = make_grid(media, columns=columns)
        save_image(grid, path)
        if self._tb is not None:
            self._tb.add_image(tag, grid, step)
        if self._wandb is not None:
            array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            self._wandb.log({f"grids/{tag}": self._wandb_image(array)}, step=step)
        return path

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
