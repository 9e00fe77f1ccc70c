"""The shapes world's exact oracle as a scorer: the verifiable reward of ``visalign demo`` and the benchmark.

It wraps :mod:`visalign.shapes.oracle` (colour segmentation, connected components, moment-based shape classification,
counting, relative position, motion track), which grades pixels against the prompt's parsed spec. The raw
score is the fraction of the prompt's attributes that the sample satisfies, already in [0, 1]; the per-attribute
grades travel in ``extras`` so a run can log which attribute alignment moved. Nothing is learnt and nothing is
loaded; the oracle is a step function of the pixels, so it is not differentiable.
"""

from __future__ import annotations

import torch

from visalign.scorers.base import RawScore, ScoreBatch, Scorer
from visalign.shapes.oracle import grade


class ShapesOracleScorer(Scorer):
    """Grade shapes-world images ``[B, 3, H, W]`` or videos ``[B, T, 3, H, W]`` against their prompts.

    Prompts must be captions of :mod:`visalign.shapes.grammar`; anything else raises ``ValueError`` naming
    the prompt. A motion prompt needs a video; a still prompt on a video holds per attribute when it holds on
    more than half of the frames.

    Returns (through ``Scorer.__call__``):
        reward, raw: float32 ``[B]`` in [0, 1], the fraction of applicable attributes satisfied.
        extras: float32 ``[B]`` each: ``colour``, ``shape``, ``count``, ``position``, ``motion`` (1 satisfied,
            0 not, NaN where the attribute does not apply to the prompt) and ``all`` (1 when every applicable
            attribute is satisfied).

    >>> import numpy as np, torch
    >>> from visalign.scorers import ScoreBatch, get_scorer
    >>> from visalign.shapes.grammar import parse_prompt
    >>> from visalign.shapes.render import render_scene
    >>> from visalign.shapes.world import sample_scene
    >>> scene = sample_scene(parse_prompt("two blue squares"), np.random.default_rng(0))
    >>> image = torch.from_numpy(render_scene(scene))
    >>> out = get_scorer("shapes-oracle")(ScoreBatch(prompts=["two blue squares", "three blue squares"],
    ...                                              media=torch.stack([image, image])))
    >>> [round(r, 3) for r in out.reward.tolist()], out.extras["count"].tolist()
    ([1.0, 0.667], [1.0, 0.0])
    """

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        assert batch.media is not None  # check_batch guarantees media for image/video scorers
        result = grade(batch.media.detach().float().cpu().numpy(), batch.prompts)
        extras = {name: torch.from_numpy(values) for name, values in result.attributes.items()}
        extras["all"] = torch.from_numpy(result.all.astype("float32"))
        return RawScore(torch.from_numpy(result.reward), extras)
