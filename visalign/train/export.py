"""Export a finished run for sharing: the LoRA (or full pipeline), its adapter config, a provenance manifest, an
optional merged pipeline, and an optional push to the Hugging Face Hub (``visalign export``).

The manifest (``visalign_manifest.json``) says where the weights came from: the base model, the objective and its
params, the reward terms, seed and iterations, the run's summary (rewards at start and end, skipped steps), the
visalign and library versions, and the SHA-256 of every exported file, so a downloaded copy can be checked.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

LORA_FILE = "pytorch_lora_weights.safetensors"
MANIFEST = "visalign_manifest.json"


def export_run(run_dir: str | Path, out_dir: str | Path, *, merge: bool = False, base: str | None = None,
               push_to_hub: str | None = None, private: bool = True) -> Path:
    """Export ``run_dir`` (a finished ``visalign train`` folder) into ``out_dir``; returns ``out_dir``.

    Args:
        merge: also write ``merged/``, the base pipeline with the LoRA fused in (stock diffusers, no visalign).
        base: the base model to merge into; default: the run's ``model.model``.
        push_to_hub: a Hub repo id to upload ``out_dir`` to (needs network and a token).

    Raises:
        FileNotFoundError: when the run has no ``final/`` or ``config.json`` (it has not finished).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    final, config_path = run_dir / "final", run_dir / "config.json"
    if not final.is_dir() or not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no final/ and config.json: it is not a finished run (a run stopped "
                                "by a signal resumes with the same `visalign train` command).")
    config = json.loads(config_path.read_text())
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    lora = (final / LORA_FILE).is_file()
    if lora:
        shutil.copy2(final / LORA_FILE, out_dir / LORA_FILE)
        (out_dir / "adapter_config.json").write_text(json.dumps(_adapter_config(final / LORA_FILE), indent=1))
    else:  # a full fine-tune: final/ is a pipeline folder
        shutil.copytree(final, out_dir / "pipeline", dirs_exist_ok=True)
    base_model = base or config["model"]["model"]
    if merge:
        if not lora:
            raise ValueError("--merge fuses a LoRA into its base; this run is a full fine-tune (its pipeline/ is "
                             "already complete).")
        _merge(base_model, out_dir / LORA_FILE, out_dir / "merged", config["model"].get("dtype", "float32"))
    manifest = _manifest(config, summary, base_model, out_dir)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if push_to_hub:
        _push(out_dir, push_to_hub, private)
    return out_dir


def _adapter_config(lora_file: Path) -> dict[str, Any]:
    """The PEFT adapter config stored in the LoRA file's metadata (by diffusers' save_lora_weights)."""
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        metadata = f.metadata() or {}
    raw = metadata.get("lora_adapter_metadata")
    return json.loads(raw) if raw else {}


def _merge(base: str, lora_file: Path, out: Path, dtype: str) -> None:
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=getattr(torch, dtype))
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(out, safe_serialization=True)


def _manifest(config: dict[str, Any], summary: dict[str, Any], base: str, out_dir: Path) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    files = {str(p.relative_to(out_dir)): _sha256(p) for p in sorted(out_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    return {"format": "visalign-export/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base_model": base, "objective": config.get("objective"), "reward": config.get("reward"),
            "seed": config.get("run", {}).get("seed"), "iterations": summary.get("iterations"),
            "summary": {k: summary.get(k) for k in ("train_reward_first", "train_reward_last", "eval_before",
                                                    "eval_after", "skipped_steps", "nan_dropped")},
            "model": config.get("model"), "versions": {n: installed(n) for n in ("visalign", "torch", "diffusers",
                                                                                "peft", "transformers")},
            "python": platform.python_version(), "files": files}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _push(out_dir: Path, repo_id: str, private: bool) -> None:
    import os

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise RuntimeError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it "
                           "(and log in with `hf auth login`) to push.")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(out_dir), repo_id=repo_id, commit_message="visalign export")
