"""Model inputs of a yes-token VLM built with batched tensor ops instead of the processor's per-sample loops.

At the tiny sizes the scorer's tests and benchmarks use (and for any small judge on a fast accelerator), the
per-sample Python of a transformers processor and of Qwen2-VL's forward dominates the cost of a batch: the processor
expands each image placeholder into N tokens by string replacement, re-tokenises the long expanded strings and
builds ``mm_token_type_ids`` in Python; the model loops over rows in ``get_rope_index`` and over images in the vision
tower's rotary position ids. This module rebuilds the same tensors with a fixed number of tensor ops per batch:

* :func:`expand_placeholders`: from the token ids of the *unexpanded* chat texts (one placeholder per image),
  repeat each placeholder id by its token count with ``repeat_interleave`` and pad. Exact because the placeholder is
  an added (special) token, which tokenizers split out before BPE, so N copies of it tokenise to N ids.
* :func:`mrope_position_ids`: Qwen2-VL's 3-D M-RoPE positions for a left- or right-padded batch, vectorised.
* :func:`qwen2_vl_encode`: the vision tower run with its rotary position ids and ``cu_seqlens`` precomputed once per
  grid (the tower pops them from its kwargs; see transformers ``vision_utils.py``).

Each function reproduces an upstream computation (transformers 5.23.0): ``ProcessorMixin.__call__`` with
``Qwen2VLProcessor.replace_image_token`` / ``LlavaProcessor.replace_image_token``;
``Qwen2VLModel.get_rope_index``; ``vision_utils.get_vision_position_ids`` / ``get_vision_cu_seqlens``. The tests
compare every output with the upstream one (tests/test_vlm_yes.py).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def expand_placeholders(rows: list[list[int]], token_id: int, counts: Tensor, pad_id: int,
                        left_pad: bool) -> tuple[Tensor, Tensor]:
    """Repeat each placeholder token by its count and pad the batch, as the processor's string expansion does.

    Args:
        rows: per text, its token ids with one placeholder per image (unpadded).
        token_id: the placeholder id (``<|image_pad|>``, ``<image>``, ...).
        counts: long ``[P]``, tokens per placeholder, in order of the placeholders over ``rows``.
        pad_id: id written at padded positions.
        left_pad: pad on the left (True) or on the right.

    Returns:
        ``(input_ids, attention_mask)``, long ``[B, L]`` with ``L`` the longest expanded row.
    """
    tokens = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.long)
    row_lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    is_placeholder = tokens == token_id
    if int(is_placeholder.sum()) != counts.numel():
        raise ValueError(f"The chat texts hold {int(is_placeholder.sum())} placeholder tokens (id {token_id}) but "
                         f"{counts.numel()} images were given; the chat template must emit one placeholder per image.")
    repeats = torch.ones_like(tokens)
    repeats[is_placeholder] = counts.to(torch.long).cpu()
    expanded = torch.repeat_interleave(tokens, repeats)
    batch = len(rows)
    row_of_token = torch.repeat_interleave(torch.arange(batch), row_lengths)
    lengths = torch.zeros(batch, dtype=torch.long).index_add_(0, row_of_token, repeats)
    width = int(lengths.max())
    row = torch.repeat_interleave(torch.arange(batch), lengths)
    col = torch.arange(expanded.numel()) - (torch.cumsum(lengths, 0) - lengths)[row]
    if left_pad:
        col = col + (width - lengths)[row]
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    input_ids[row, col] = expanded
    attention_mask[row, col] = 1
    return input_ids, attention_mask


def mrope_position_ids(input_ids: Tensor, attention_mask: Tensor, vision_ids: tuple[int, ...], grids: Tensor,
                       spatial_merge: int) -> Tensor:
    """Qwen2-VL's 3-D rotary positions (temporal, height, width) for a padded batch, with no per-row loop.

    Text tokens advance all three positions by 1. A block of vision tokens (one image or video, ``t·h·w`` merged
    patches) gets ``start + (t_i, h_i, w_i)`` and the text after it resumes at ``start + max(h, w)``, as in
    ``Qwen2VLModel.get_rope_index`` (which ignores ``t`` in that advance; so do we, to stay equal to it). Padded
    positions are 0.

    Args:
        input_ids: long ``[B, L]``, placeholders already expanded.
        attention_mask: ``[B, L]``, 1 on real tokens.
        vision_ids: the placeholder ids (image and video pad tokens).
        grids: long ``[N, 3]``, ``(t, h, w)`` in patches of each vision block, in row-major order of the blocks.
        spatial_merge: the vision tower's spatial merge size (h and w are divided by it).

    Returns:
        long ``[3, B, L]``.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    real = attention_mask.bool()
    vision = torch.zeros_like(real)
    for token in vision_ids:
        vision |= input_ids == token
    vision &= real
    starts = vision & ~F.pad(vision[:, :-1], (1, 0), value=False)
    ends = vision & ~F.pad(vision[:, 1:], (0, 1), value=False)
    if int(starts.sum()) != grids.shape[0]:
        raise ValueError(f"{int(starts.sum())} vision blocks in the tokens but {grids.shape[0]} grids.")
    llm = grids.to(device).clone()
    llm[:, 1:] = llm[:, 1:] // spatial_merge
    block = (torch.cumsum(starts.flatten().long(), 0) - 1).clamp(min=0).view(batch, length)
    grid = llm[block]  # [B, L, 3]: the grid of the block each token would belong to (meaningful on vision tokens)
    index = torch.arange(length, device=device).expand(batch, length)
    within = index - torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    area = grid[..., 1] * grid[..., 2]
    offsets = torch.stack([within // area, (within // grid[..., 2]) % grid[..., 1], within % grid[..., 2]])
    advance = torch.where(vision, torch.where(ends, grid[..., 1:].amax(-1), torch.zeros_like(index)), real.long())
    base = torch.cumsum(advance, dim=1) - advance  # position where each token's text run or vision block starts
    positions = base.unsqueeze(0) + torch.where(vision.unsqueeze(0), offsets, torch.zeros_like(offsets))
    return torch.where(real.unsqueeze(0), positions, torch.zeros_like(positions))


@lru_cache(maxsize=32)
def _vision_rotary_ids(t: int, h: int, w: int, merge: int) -> Tensor:
    """Rotary (h, w) ids of one vision input's patches, merge-window-major; ``[t·h·w, 2]`` long.

    # Copied from transformers.vision_utils.get_vision_position_ids (transformers 5.23.0), for one grid.
    """
    hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(shape).transpose(1, 2).flatten()
    wpos = wpos.reshape(shape).transpose(1, 2).flatten()
    return torch.stack([hpos, wpos], dim=-1).repeat(t, 1)


def qwen2_vl_encode(visual: Any, pixel_values: Tensor, grid_thw: Tensor) -> Any:
    """Run a Qwen2-VL / Qwen2.5-VL vision tower with its per-image index tensors precomputed.

    Within one scorer batch every visual input has the same grid (the scorer requires same-sized media), so the
    rotary ids of one grid are computed once (and cached) and tiled; upstream rebuilds them image by image.

    Args:
        visual: ``model.model.visual``.
        pixel_values: float ``[Σ t·h·w, C·T·p·p]`` from the processor or the tensor path.
        grid_thw: long ``[N, 3]``.

    Returns:
        The tower's ``BaseModelOutputWithPooling``; ``pooler_output`` holds the merged features ``[Σ t·h·w/m², D]``.
    """
    merge = visual.spatial_merge_size
    grids = [tuple(g) for g in grid_thw.tolist()]
    per_grid = {g: _vision_rotary_ids(*g, merge) for g in set(grids)}
    if len(per_grid) == 1:
        rotary = per_grid[grids[0]].repeat(len(grids), 1)
    else:  # mixed sizes: concatenated in input order, as upstream
        rotary = torch.cat([per_grid[g] for g in grids])
    frames = grid_thw[:, 0].to(torch.long)
    seqlens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], frames)
    cu_seqlens = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0), value=0)
    device = pixel_values.device
    return visual(pixel_values, grid_thw=grid_thw.to(device), position_ids=rotary.to(device),
                  cu_seqlens=cu_seqlens.to(device))
