"""Convert a checkpoint published only as a pickle (``.pt``/``.pth``/``.bin``) once into safetensors.

docs/extending.md#dependencies: we never unpickle a downloaded file in the normal loading path. Some weights are
published only as pickles (the LAION aesthetic MLP ``sac+logos+ava1-l14-linearMSE.pth``, ``HPS_v2.1_compressed.pt``);
this module reads them with ``torch.load(..., weights_only=True)``, which refuses arbitrary Python objects, flattens
them to a ``name → tensor`` mapping and writes a ``.safetensors`` file that the scorers load from then on.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Containers that training scripts wrap a state dict in (open_clip/HPS save {"epoch", "state_dict", ...}).
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")
# DataParallel / DDP checkpoints prefix every key with "module."; nothing that loads them expects it.
_DDP_PREFIX = "module."


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_checkpoint` wrote.

    Attributes:
        destination: the safetensors file.
        num_tensors: how many tensors it holds.
        num_parameters: total element count over all tensors.
        source_sha256: hex digest of the source pickle, stored in the file's metadata as well.
    """

    destination: Path
    num_tensors: int
    num_parameters: int
    source_sha256: str


def load_pickle_checkpoint(source: str | os.PathLike[str]) -> Any:
    """``torch.load(source, weights_only=True)`` with an error that says why a file is refused.

    Raises:
        FileNotFoundError: when ``source`` does not exist.
        ValueError: when the pickle holds objects other than tensors and plain containers.
    """
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"Checkpoint {source} does not exist; download the published file first.")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{source} holds Python objects that weights_only loading refuses ({err}). visalign does "
                         "not unpickle arbitrary objects; convert it with the publisher's own code in an isolated "
                         "environment, or use a safetensors release.") from None


def extract_state_dict(obj: Any, key: str | None = None) -> dict[str, Tensor]:
    """Find the ``name → tensor`` mapping inside a loaded checkpoint.

    Args:
        obj: what ``torch.load`` returned: a state dict, or a dict wrapping one under ``key`` (or one of
            ``STATE_DICT_KEYS`` when ``key`` is None).
        key: the wrapping key to use, e.g. ``"state_dict"``.

    Returns:
        ``name → tensor`` with any ``module.`` prefix removed.

    Raises:
        ValueError: when no mapping of tensors is found; the message lists the top-level keys.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"Checkpoint holds a {type(obj).__name__}, not a dict of tensors.")
    if key is not None:
        if key not in obj:
            raise ValueError(f"Checkpoint has no key {key!r}; top-level keys: {sorted(map(str, obj))[:20]}.")
        obj = obj[key]
    elif not _all_tensors(obj):
        found = [k for k in STATE_DICT_KEYS if isinstance(obj.get(k), dict) and _all_tensors(obj[k])]
        if not found:
            raise ValueError(f"No state dict found; top-level keys: {sorted(map(str, obj))[:20]}. Pass the key "
                             "that holds the tensors (--key).")
        obj = obj[found[0]]
    if not _all_tensors(obj):
        bad = [k for k, v in obj.items() if not isinstance(v, Tensor)][:5]
        raise ValueError(f"Entries {bad} are not tensors; pick the key that holds only tensors (--key).")
    if obj and all(str(k).startswith(_DDP_PREFIX) for k in obj):
        obj = {str(k)[len(_DDP_PREFIX):]: v for k, v in obj.items()}
    return {str(k): v for k, v in obj.items()}


def _all_tensors(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def convert_checkpoint(source: str | os.PathLike[str], destination: str | os.PathLike[str], *,
                       key: str | None = None, overwrite: bool = False) -> ConversionReport:
    """Convert a pickled checkpoint into a safetensors file.

    Args:
        source: the published ``.pt``/``.pth``/``.bin`` file.
        destination: the ``.safetensors`` file to write (parent folders are created).
        key: the key wrapping the state dict, when it is not found automatically.
        overwrite: replace an existing destination.

    Returns:
        A :class:`ConversionReport`.

    >>> import tempfile, torch, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> torch.save({"state_dict": {"module.w": torch.ones(2)}}, folder / "ckpt.pt")
    >>> convert_checkpoint(folder / "ckpt.pt", folder / "ckpt.safetensors").num_tensors
    1
    """
    from safetensors.torch import save_file

    source, destination = Path(source), Path(destination)
    if destination.suffix != ".safetensors":
        raise ValueError(f"Destination {destination} must end in .safetensors.")
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists; pass overwrite=True (--overwrite) to replace it.")
    state = extract_state_dict(load_pickle_checkpoint(source), key=key)
    # safetensors refuses tensors that share storage (tied weights, views); clone each into its own buffer.
    tensors = {name: t.detach().clone().contiguous() for name, t in state.items()}
    digest = _sha256(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".partial")
    save_file(tensors, str(tmp), metadata={"converted_from": source.name, "source_sha256": digest})
    tmp.replace(destination)  # atomic: a crash never leaves a half-written file under the final name
    return ConversionReport(destination=destination, num_tensors=len(tensors),
                            num_parameters=sum(t.numel() for t in tensors.values()), source_sha256=digest)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
