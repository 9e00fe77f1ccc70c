"""Named reward deployments (``reward.deployments``): where a reward term's scorer runs, named once in the recipe
and referred to as ``@name`` in ``reward.terms`` (docs/serving.md#deployments).

.. code-block:: yaml

    reward:
      deployments:
        judge: {kind: http, url: "http://10.0.0.7:8100", scorer: pickscore, token_env: VISALIGN_TOKEN}
        vqa: {kind: openai, url: "http://127.0.0.1:8000/v1", model: Qwen/Qwen2-VL-7B-Instruct}
        local-clip: {kind: local, scorer: clip-vit-b32}
      terms: ["@judge", {scorer: "@vqa", weight: 0.5}]

Kinds (:data:`KINDS`): ``local`` (a registered scorer in this process), ``http`` (``visalign serve``, read by the
``remote-served`` scorer) and ``openai`` (an OpenAI-compatible server with logprobs, read by ``remote-vqascore``).
``params`` of a deployment override the scorer card's params. A term named by a deployment is logged under the
deployment's name unless it has its own ``name``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from visalign.scorers import Scorer, get_scorer


def _local(d: dict[str, Any], device: str, dtype: Any) -> Scorer:
    return get_scorer(_need(d, "scorer"), device=device, dtype=dtype, params=d.get("params"))


def _http(d: dict[str, Any], device: str, dtype: Any) -> Scorer:
    params = {**(d.get("params") or {}), **({"token_env": d["token_env"]} if d.get("token_env") else {})}
    return get_scorer("remote-served", weights={"base_url": _need(d, "url"), "scorer": d.get("scorer")},
                      params=params)


def _openai(d: dict[str, Any], device: str, dtype: Any) -> Scorer:
    params = {**(d.get("params") or {}), **({"api_key_env": d["token_env"]} if d.get("token_env") else {})}
    return get_scorer("remote-vqascore", weights={"base_url": _need(d, "url"), "model": _need(d, "model")},
                      params=params)


KINDS: dict[str, Callable[[dict[str, Any], str, Any], Scorer]] = {"local": _local, "http": _http, "openai": _openai}
KEYS = {"kind", "scorer", "url", "model", "token_env", "params"}


def _need(d: dict[str, Any], key: str) -> Any:
    if not d.get(key):
        raise ValueError(f"reward deployment of kind {d.get('kind')!r} needs {key!r}; got {d}.")
    return d[key]


def resolve_terms(terms: list[Any], deployments: dict[str, dict[str, Any]], *, device: str, dtype: Any
                  ) -> list[Any]:
    """``terms`` with every ``@name`` scorer replaced by the deployment's :class:`Scorer` (others unchanged)."""
    for name, d in deployments.items():
        if not isinstance(d, dict) or d.get("kind") not in KINDS:
            raise ValueError(f"reward.deployments.{name} must be a mapping with kind one of {sorted(KINDS)}; got {d}.")
        unknown = set(d) - KEYS
        if unknown:
            raise ValueError(f"reward.deployments.{name} has unknown key(s) {sorted(unknown)}; allowed: "
                             f"{sorted(KEYS)}.")
    out = []
    for term in terms:
        entry = {"scorer": term} if isinstance(term, str) else term
        ref = entry.get("scorer") if isinstance(entry, dict) else None
        if not (isinstance(ref, str) and ref.startswith("@")):
            out.append(term)
            continue
        name = ref[1:]
        if name not in deployments:
            raise ValueError(f"reward term {term!r} names deployment {name!r}, which reward.deployments does not "
                             f"define (it defines {sorted(deployments)}).")
        d = deployments[name]
        out.append({**entry, "scorer": KINDS[d["kind"]](d, device, dtype), "name": entry.get("name") or name})
    return out
