"""The wire format of ``visalign serve`` (docs/serving.md#schema): request bodies as PNG-in-JSON or safetensors
bytes, never pickle, and the JSON answer. Shared by the server (``visalign/serving/server.py``) and its client
(:class:`visalign.scorers.remote.ServedScorer`), so both sides read the same bytes the same way.

A request is a batch of samples for one scorer:

- ``application/json``: ``{"scorer": ID, "prompts": [B str], "images": [B base64 PNG], "metadata": [B dict]}``
  (``scorer`` may be left out when the server serves one scorer; ``metadata`` is optional);
- ``application/x-safetensors``: a safetensors file with the tensor ``media`` (uint8 in [0, 255] or float in
  [0, 1], ``[B, 3, H, W]`` or ``[B, T, 3, H, W]``) and the string metadata ``prompts`` (a JSON list), optionally
  ``scorer`` and ``metadata`` (JSON).

The answer is ``{"scorer": ID, "reward": [B], "raw": [B], "extras": {name: [B]}, "batch": {"requests": k,
"samples": n}}``; NaN ("does not apply") travels as ``null``.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

JSON = "application/json"
SAFETENSORS = "application/x-safetensors"
CONTENT_TYPES = (JSON, SAFETENSORS)


class WireError(ValueError):
    """A request or answer body that does not follow the schema; the message says which part is wrong."""


@dataclass
class ScoreRequest:
    """One decoded request: ``media`` float32 in [0, 1], ``[B, 3, H, W]`` or ``[B, T, 3, H, W]``."""

    prompts: list[str]
    media: Tensor
    scorer: str | None = None
    metadata: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.media.ndim not in (4, 5) or self.media.shape[-3] != 3:
            raise WireError(f"media must be [B, 3, H, W] or [B, T, 3, H, W]; got shape {tuple(self.media.shape)}.")
        if len(self.prompts) != self.media.shape[0] or not all(isinstance(p, str) for p in self.prompts):
            raise WireError(f"prompts must be {self.media.shape[0]} strings, one per sample; got "
                            f"{str(self.prompts)[:80]}.")
        if self.metadata is not None and (len(self.metadata) != len(self.prompts)
                                          or not all(isinstance(m, dict) for m in self.metadata)):
            raise WireError("metadata must be one object per sample.")


@dataclass
class ScoreAnswer:
    """One decoded answer: float32 ``[B]`` tensors (NaN where the server sent null)."""

    scorer: str
    reward: Tensor
    raw: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    batch: dict[str, int] = field(default_factory=dict)


def _png(image: Tensor) -> str:
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_request(request: ScoreRequest, content_type: str = SAFETENSORS) -> bytes:
    """Request bytes in ``content_type`` (PNG-in-JSON quantises to 8 bits; safetensors sends float32 exactly)."""
    if content_type == JSON:
        if request.media.ndim != 4:
            raise WireError("PNG-in-JSON carries images only; send videos as application/x-safetensors.")
        body = {"prompts": request.prompts, "images": [_png(m) for m in request.media.detach().float().cpu()]}
        if request.scorer is not None:
            body["scorer"] = request.scorer
        if request.metadata is not None:
            body["metadata"] = request.metadata
        return json.dumps(body).encode("utf-8")
    if content_type == SAFETENSORS:
        from safetensors.torch import save

        meta = {"prompts": json.dumps(request.prompts)}
        if request.scorer is not None:
            meta["scorer"] = request.scorer
        if request.metadata is not None:
            meta["metadata"] = json.dumps(request.metadata)
        return save({"media": request.media.detach().float().cpu().contiguous()}, metadata=meta)
    raise WireError(f"content type {content_type!r} is not one of {CONTENT_TYPES}.")


def decode_request(body: bytes, content_type: str) -> ScoreRequest:
    """Parse request bytes; raises :class:`WireError` for anything off the schema (the server answers 4xx)."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == JSON:
        return _decode_json(body)
    if kind == SAFETENSORS:
        return _decode_safetensors(body)
    raise WireError(f"unsupported Content-Type {content_type!r}; send one of {CONTENT_TYPES} (pickle is never "
                    "accepted).")


def _decode_json(body: bytes) -> ScoreRequest:
    from PIL import Image, UnidentifiedImageError

    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"body is not JSON ({err}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        raise WireError("a JSON request is an object with a non-empty 'images' list (base64 PNG) and 'prompts'.")
    images = []
    for i, text in enumerate(data["images"]):
        try:
            image = Image.open(io.BytesIO(base64.b64decode(str(text), validate=True)))
            if image.format != "PNG":
                raise WireError(f"images[{i}] is {image.format}, not PNG.")
            array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
            images.append(array.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255)
        except (ValueError, UnidentifiedImageError, OSError) as err:
            raise WireError(f"images[{i}] is not a base64 PNG ({err}).") from None
    if len({tuple(m.shape) for m in images}) != 1:
        raise WireError("all images of one request must have the same size.")
    return ScoreRequest(prompts=list(data.get("prompts") or []), media=torch.stack(images),
                        scorer=data.get("scorer"), metadata=data.get("metadata"))


def _decode_safetensors(body: bytes) -> ScoreRequest:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(body)
        meta = _safetensors_metadata(body)
        prompts = json.loads(meta["prompts"])
        metadata = json.loads(meta["metadata"]) if "metadata" in meta else None
    except (SafetensorError, ValueError, KeyError, RuntimeError) as err:
        raise WireError(f"body is not a safetensors file with 'media' and metadata 'prompts' ({err}).") from None
    media = tensors.get("media")
    if media is None:
        raise WireError(f"the safetensors body has no 'media' tensor (it has {sorted(tensors)}).")
    if media.dtype == torch.uint8:
        media = media.float() / 255
    elif media.is_floating_point():
        media = media.float()
    else:
        raise WireError(f"media must be uint8 or floating point; got {media.dtype}.")
    if not isinstance(prompts, list):
        raise WireError("metadata 'prompts' must be a JSON list of strings.")
    return ScoreRequest(prompts=prompts, media=media, scorer=meta.get("scorer"), metadata=metadata)


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors buffer (its 8-byte little-endian header length, then JSON)."""
    if len(body) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(body[:8], "little")
    header = json.loads(body[8:8 + size])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not an object")
    return meta


def _floats(values: Tensor) -> list[float | None]:
    return [None if not math.isfinite(v) else v for v in values.detach().float().cpu().tolist()]


def encode_answer(answer: ScoreAnswer) -> bytes:
    return json.dumps({"scorer": answer.scorer, "reward": _floats(answer.reward), "raw": _floats(answer.raw),
                       "extras": {k: _floats(v) for k, v in answer.extras.items()}, "batch": answer.batch}
                      ).encode("utf-8")


def decode_answer(body: bytes, size: int) -> ScoreAnswer:
    """Parse an answer for a request of ``size`` samples; raises :class:`WireError` when it does not fit."""
    def tensor(values: Any, name: str) -> Tensor:
        if not isinstance(values, list) or len(values) != size:
            raise WireError(f"answer field {name!r} must be a list of {size} numbers; got {str(values)[:80]}.")
        return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)

    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"answer is not JSON ({err}): {body[:120]!r}") from None
    if not isinstance(data, dict):
        raise WireError(f"answer is not a JSON object: {body[:120]!r}")
    extras = {k: tensor(v, f"extras.{k}") for k, v in (data.get("extras") or {}).items()}
    return ScoreAnswer(scorer=str(data.get("scorer")), reward=tensor(data.get("reward"), "reward"),
                       raw=tensor(data.get("raw"), "raw"), extras=extras, batch=dict(data.get("batch") or {}))
