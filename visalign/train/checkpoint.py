"""Atomic, resumable training checkpoints (safetensors + JSON; no pickle).

A checkpoint is a folder ``checkpoints/step-000010/`` holding the trainable weights (``weights.safetensors``),
the optimizer's tensors (``optimizer.safetensors``), RNG states and EMA, and ``state.json`` (step, data position,
scheduler, stateful reward transforms, optimizer hyper-parameters). It is written into a temporary sibling
folder and renamed into place only when complete, and ``COMPLETE`` is its last file: a crash mid-write leaves
a ``.tmp-*`` folder that :func:`latest_checkpoint` ignores (and the next save removes); a write that fails (disk
full) removes its temp folder at once, and the previous checkpoints are never touched before the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
MARKER = "COMPLETE"
# Only a folder named exactly step-NNNNNN is a checkpoint: a temp folder killed after COMPLETE was written but
# before its rename (step-000010.tmp-123) or one being pruned (.trash-*) must never be picked up.
_NAME = re.compile(r"step-(\d+)")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run (named ``step-NNNNNN`` and holding ``COMPLETE``), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name) and (p / MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str | Path, step: int, *, params: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict[str, Any], extra_tensors: dict[str, torch.Tensor],
                    state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep_last``.

    Args:
        params: name → trainable tensor (saved exactly, in their dtype).
        optimizer: the optimizer (or its ``state_dict()``, e.g. gathered from shards); the state dict is split
            into tensors (safetensors) and plain values (JSON).
        extra_tensors: RNG states, EMA shadow weights, ... (name → tensor).
        state: JSON-serialisable run state (step, data position, scheduler, transforms...).
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    # Leftovers of a crash: temp folders, folders being pruned, and step folders that never got their marker.
    for stale in [*root.glob("*.tmp-*"), *root.glob(".trash-*"), *root.glob(f"{PREFIX}*")]:
        if stale.is_dir() and not (_NAME.fullmatch(stale.name) and (stale / MARKER).is_file()):
            shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / "weights.safetensors"))
        opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        opt_tensors, opt_meta = _flatten_optimizer(opt_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()},
                  str(tmp / "extra.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}, indent=1))
        _fsync_dir(tmp)
        (tmp / MARKER).write_text(str(step))
    except OSError:  # disk full, quota: give the space back; the previous checkpoints were never touched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        _discard(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        _discard(old)
    return final


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder so that no crash leaves it half-deleted under its name: rename it out of the
    ``step-NNNNNN`` namespace first (atomic), then remove the files."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor],
                                               dict[str, Any]]:
    """``(params, optimizer_state_dict, extra_tensors, state)`` of a checkpoint folder."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} file); pick another one.")
    state = json.loads((path / "state.json").read_text())
    optimizer = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
    return (load_file(str(path / "weights.safetensors")), optimizer, load_file(str(path / "extra.safetensors")),
            state)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
