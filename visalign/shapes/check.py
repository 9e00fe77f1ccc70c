"""``visalign shapes build --check``: retrain a small part of a shipped asset and compare with what was recorded.

A full rebuild takes most of an hour, so the check retrains the cheapest part that still exercises the whole
training path: ``steps`` UNet + text-encoder steps from a fresh seeded init, on latents of the *shipped* VAE,
with the shipped tokenizer. It passes when

- two such runs give bit-identical weights (the build is deterministic for a fixed seed on this machine), and
- the run's mean loss matches the value the build recorded in ``build.json`` (``"check"``) within ``rel_tol``
  (the same machine reproduces it exactly; another CPU may round differently), and
- the shipped VAE's reconstruction oracle accuracy matches the recorded one within ``abs_tol``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECK_STEPS = 20
CHECK_BATCH = 16


@dataclass
class CheckRun:
    """One short retraining: the mean loss over its steps and a SHA-256 of every trained weight."""

    loss_mean: float
    weights_sha256: str


def _weights_digest(*modules: Any) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def short_unet_run(asset_dir: str | Path, *, seed: int, steps: int = CHECK_STEPS, batch_size: int = CHECK_BATCH,
                   config_overrides: dict[str, Any] | None = None) -> CheckRun:
    """Train a fresh UNet + text encoder for ``steps`` on the shipped VAE/tokenizer of ``asset_dir``.

    Args:
        asset_dir: a t2i pipeline folder written by :func:`visalign.shapes.build_t2i.build_t2i`.
        seed: build seed (the same seed must give the same weights).
        steps: optimizer steps; batch_size: captioned images per step.
        config_overrides: extra :class:`~visalign.shapes.build_t2i.T2IBuildConfig` fields (e.g. smaller
            ``unet_channels`` in tests).
    """
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from visalign.shapes.build_t2i import T2IBuildConfig, new_denoiser_state, set_determinism, train_denoiser

    folder = Path(asset_dir)
    recorded = _recorded_config(folder)
    fields = {k: v for k, v in recorded.items() if k in {"unet_channels", "text_width", "lr", "warmup_steps",
                                                         "ema_decay", "caption_dropout", "extra_object_p"}}
    fields.update(config_overrides or {})
    config = T2IBuildConfig(out=str(folder), work_dir=str(folder), seed=seed, unet_steps=steps,
                            unet_minutes=1e9, batch_size=batch_size, **fields)
    set_determinism(config.threads)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    state = new_denoiser_state(folder / "tokenizer", config)
    train_denoiser(state, vae, tokenizer, float(vae.config.scaling_factor), config, log=lambda record: None)
    return CheckRun(float(sum(state.losses) / len(state.losses)), _weights_digest(state.unet, state.text_encoder))


def _recorded_config(folder: Path) -> dict[str, Any]:
    path = folder / "build.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; --check compares against the metrics a build records. "
                                "Rebuild with 'visalign shapes build --only t2i'.")
    return json.loads(path.read_text()).get("config", {})


def record_check(asset_dir: str | Path, seed: int) -> dict[str, Any]:
    """Run the short retraining once and store its result under ``"check"`` in ``build.json``."""
    folder = Path(asset_dir)
    run = short_unet_run(folder, seed=seed)
    metrics = json.loads((folder / "build.json").read_text())
    metrics["check"] = {"steps": CHECK_STEPS, "batch_size": CHECK_BATCH, "seed": seed, "loss_mean": run.loss_mean,
                        "weights_sha256": run.weights_sha256}
    (folder / "build.json").write_text(json.dumps(metrics, indent=1))
    return metrics["check"]


def check_t2i(asset_dir: str | Path, *, rel_tol: float = 0.02, abs_tol: float = 0.03) -> dict[str, Any]:
    """Compare a fresh short retraining (twice) and the shipped VAE against ``build.json``.

    Returns:
        ``{"ok": bool, "problems": [str], ...measurements}``; ``ok`` is False with a reason per failed item.
    """
    import torch
    from diffusers import AutoencoderKL

    from visalign.shapes.build_t2i import vae_reconstruction_accuracy

    folder = Path(asset_dir)
    metrics = json.loads((folder / "build.json").read_text()) if (folder / "build.json").exists() else {}
    recorded = metrics.get("check")
    if recorded is None:
        raise ValueError(f"{folder / 'build.json'} has no 'check' record; run 'visalign shapes build' to write one.")
    problems: list[str] = []
    first = short_unet_run(folder, seed=recorded["seed"], steps=recorded["steps"], batch_size=recorded["batch_size"])
    second = short_unet_run(folder, seed=recorded["seed"], steps=recorded["steps"], batch_size=recorded["batch_size"])
    if first.weights_sha256 != second.weights_sha256:
        problems.append("two runs with the same seed gave different weights (build not deterministic here)")
    rel = abs(first.loss_mean - recorded["loss_mean"]) / max(abs(recorded["loss_mean"]), 1e-12)
    if rel > rel_tol:
        problems.append(f"loss {first.loss_mean:.5f} vs recorded {recorded['loss_mean']:.5f} "
                        f"({rel:.1%} > {rel_tol:.0%})")
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32).eval()
    recon = vae_reconstruction_accuracy(vae, metrics["config"]["seed"])
    want = metrics.get("vae_recon", {}).get("all")
    if want is not None and abs(recon["all"] - want) > abs_tol:
        problems.append(f"VAE reconstruction accuracy {recon['all']:.3f} vs recorded {want:.3f} (> {abs_tol})")
    return {"ok": not problems, "problems": problems, "loss_mean": first.loss_mean,
            "recorded_loss_mean": recorded["loss_mean"],
            "same_weights_twice": first.weights_sha256 == second.weights_sha256,
            "matches_recorded_weights": first.weights_sha256 == recorded.get("weights_sha256"),
            "vae_recon_all": recon["all"], "recorded_vae_recon_all": want}
