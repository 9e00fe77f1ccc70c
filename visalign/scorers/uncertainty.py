"""Uncertainty-aware rewards: Ctrl-U generalised (docs/methods.md#uncertainty) — disagreement U → weight exp(−U/τ).

Ctrl-U (ICLR 2025; grenoble-zhang/Ctrl-U ``train/ctrlu-reward.py``) down-weights reward terms whose reward model
disagrees with itself across near-identical inputs. This wrapper measures U as the **variance** of one base
scorer's reward over K evaluations, chosen by ``params.mode``:

* ``ensemble``: across the members of an ensemble base (``extras["members"] [B, M]``, e.g. ``ensemble-color``).
* ``augment``: across K views of each input. View 0 is the input itself; view k ≥ 1 is a crop of
  ``(1 − crop_fraction)`` of each side at an offset drawn from ``seed + k``, resized back to H × W, plus Gaussian
  pixel noise of std ``noise_std`` drawn from the same generator, clamped to [0, 1]. One draw per view is shared
  by every sample, so a sample's views never depend on its batch-mates and two calls agree exactly.
* ``group``: across the K generations of the same condition in the batch, grouped by ``metadata[i]["group"]``
  when every sample has one, else by prompt (U_i = the group's reward variance; a group of one has U = 0).

U is then normalised (``normalize``): ``batch-mean`` divides by the batch's mean U, ``running-mean`` by an
exponential moving average of batch means (momentum ``momentum``, kept in ``state_dict()``), ``none`` keeps
reward units. The weight is ``w = exp(−U_norm / τ)``, rescaled to mean 1 over the batch so that re-weighting a
loss or advantages does not change its overall scale.

The reward is the base reward, unchanged: the weights are for the objectives (multiply advantages or a
reward-backprop loss by ``extras["weight"]``). U and the weights are detached ("reweight" mode of
docs/methods.md#uncertainty); the "hetero" mode, where the generator sees dU, belongs in an objective. Because the
reward never depends on the batch, the card kind stays ``pointwise`` in every mode; the *extras* do depend on the batch
with ``batch-mean`` normalisation and in ``group`` mode (by design: U there is a property of the group).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from visalign.media import resize_to
from visalign.reductions import group_index, group_stats, nan_var
from visalign.scorers.base import RawScore, ScoreBatch, ScoreOutput, Scorer
from visalign.scorers.card import ScorerCard
from visalign.scorers.ensemble import build_inner_scorer

MODES = ("ensemble", "augment", "group")
NORMALIZATIONS = ("batch-mean", "running-mean", "none")


class UncertaintyScorer(Scorer):
    """A base scorer's reward plus a per-sample uncertainty and weight (see the module docstring for modes).

    Card params:
        base: the wrapped scorer spec (an id, or ``{scorer: id, params: {...}}``).
        mode: ``ensemble`` | ``augment`` | ``group``.
        num_views: K ≥ 2 evaluations in ``augment`` mode (view 0 is the input itself); default 4.
        crop_fraction: fraction of each side cropped away in an augmented view, in [0, 0.5); default 0.1.
        noise_std: std of the Gaussian pixel noise of an augmented view, in pixel units of [0, 1]; default 0.02.
        seed: seed of the augmentations; default 0.
        normalize: ``batch-mean`` | ``running-mean`` | ``none``; default ``batch-mean``.
        momentum: EMA momentum of ``running-mean``; default 0.9.
        tau: temperature τ > 0 of ``exp(−U/τ)``; default 1.

    Returns (from ``__call__``):
        ``ScoreOutput`` with the base reward as ``raw [B]`` (the card maps it with identity) and extras
        ``uncertainty [B]`` (variance, reward units²), ``uncertainty_normalized [B]``, ``weight [B]`` (> 0, mean 1)
        and ``base_raw [B]`` (the base scorer's native score).

    Differentiable iff the base scorer is (the gradient flows through the base reward only).

    >>> import torch
    >>> from visalign.scorers import ScoreBatch, get_scorer
    >>> scorer = get_scorer("uncertainty-color")
    >>> media = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> out = scorer(ScoreBatch(prompts=["a", "b"], media=media))
    >>> out.extras["weight"].shape, round(out.extras["weight"].mean().item(), 4)
    (torch.Size([2]), 1.0)
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(card, device=device, dtype=dtype)
        p = card.params
        where = f"card {card.source or card.id}"
        if "base" not in p:
            raise ValueError(f"Uncertainty {where} needs params.base: the scorer whose disagreement is measured.")
        self.base_spec: Any = p["base"]
        self.mode = str(p.get("mode", "augment"))
        self.num_views = int(p.get("num_views", 4))
        self.crop_fraction = float(p.get("crop_fraction", 0.1))
        self.noise_std = float(p.get("noise_std", 0.02))
        self.seed = int(p.get("seed", 0))
        self.u_normalize = str(p.get("normalize", "batch-mean"))
        self.momentum = float(p.get("momentum", 0.9))
        self.tau = float(p.get("tau", 1.0))
        if self.mode not in MODES:
            raise ValueError(f"Uncertainty {where}: mode {self.mode!r} is not one of {MODES}.")
        if self.u_normalize not in NORMALIZATIONS:
            raise ValueError(f"Uncertainty {where}: normalize {self.u_normalize!r} is not one of {NORMALIZATIONS}.")
        if self.num_views < 2:
            raise ValueError(f"Uncertainty {where}: num_views must be >= 2 (disagreement needs two views).")
        if not 0.0 <= self.crop_fraction < 0.5 or self.noise_std < 0:
            raise ValueError(f"Uncertainty {where}: need 0 <= crop_fraction < 0.5 and noise_std >= 0.")
        if self.tau <= 0 or not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"Uncertainty {where}: need tau > 0 and 0 <= momentum < 1.")
        self.running_mean: float | None = None
        self._base: Scorer | None = None

    @property
    def base(self) -> Scorer:
        """The wrapped scorer, built on first access."""
        if self._base is None:
            self._base = build_inner_scorer(self.base_spec, self)
        return self._base

    @property
    def differentiable(self) -> bool:
        return self.base.differentiable

    def load(self) -> None:
        self.base  # noqa: B018 -- build (and validate) the base before the first score

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        out = self.base(batch, grad=torch.is_grad_enabled())
        with torch.no_grad():
            uncertainty = self.uncertainty(batch, out)
            normalized = uncertainty / self._scale(uncertainty)
            weight = torch.exp(-normalized / self.tau)
            weight = weight / weight.nanmean()  # a sample the base abstains on (NaN) must not void the rest
        return RawScore(out.reward, extras={"uncertainty": uncertainty, "uncertainty_normalized": normalized,
                                            "weight": weight, "base_raw": out.raw.detach()})

    def uncertainty(self, batch: ScoreBatch, base_out: ScoreOutput) -> Tensor:
        """U ``[B]`` float32 ≥ 0: the variance of the base reward across the mode's K evaluations."""
        if self.mode == "ensemble":
            members = base_out.extras.get("members")
            if members is None or members.ndim != 2:
                raise ValueError(f"Uncertainty mode 'ensemble' needs a base scorer with extras['members'] [B, M]; "
                                 f"{self.base.id!r} has none. Use an ensemble card as base (e.g. ensemble-color).")
            return nan_var(members.float())
        reward = base_out.reward.detach().float()
        if self.mode == "group":
            meta = batch.metadata
            ids = [m["group"] for m in meta] if meta and all("group" in m for m in meta) else batch.prompts
            _, std, _ = group_stats(reward, group_index(ids, len(batch)).to(reward.device), ddof=0)
            return std**2
        views = [reward] + [self.base(self._augment(batch, k), grad=False).reward.float() for k in
                            range(1, self.num_views)]
        return nan_var(torch.stack(views, dim=1))

    def _augment(self, batch: ScoreBatch, k: int) -> ScoreBatch:
        media = batch.media
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        height, width = media.shape[-2:]
        crop_h = max(1, round(height * (1 - self.crop_fraction)))
        crop_w = max(1, round(width * (1 - self.crop_fraction)))
        top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
        noise = torch.randn(media.shape[1:], generator=generator).to(media.device, media.dtype) * self.noise_std
        view = resize_to(media[..., top:top + crop_h, left:left + crop_w], (height, width))
        view = (view + noise).clamp(0.0, 1.0)
        return ScoreBatch(prompts=batch.prompts, media=view, references=batch.references, metadata=batch.metadata)

    def _scale(self, uncertainty: Tensor) -> float:
        eps = 1e-12  # U is a variance; all-zero U gives weight 1 everywhere instead of 0/0
        if self.u_normalize == "none":
            return 1.0
        batch_mean = float(uncertainty[~torch.isnan(uncertainty)].mean()) if uncertainty.numel() else 0.0
        if math.isnan(batch_mean):
            batch_mean = 0.0
        if self.u_normalize == "batch-mean":
            return batch_mean + eps
        self.running_mean = batch_mean if self.running_mean is None else \
            self.momentum * self.running_mean + (1 - self.momentum) * batch_mean
        return self.running_mean + eps

    def state_dict(self) -> dict[str, Any]:
        """The running mean of U (``running-mean`` normalisation), for checkpoint/resume."""
        return {"running_mean": self.running_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "running_mean" not in state:
            raise ValueError(f"Uncertainty scorer state needs 'running_mean'; got keys {sorted(state)}.")
        value = state["running_mean"]
        self.running_mean = None if value is None else float(value)
