"""Yes-token scores from a VLM behind an OpenAI-compatible chat-completions endpoint (vLLM, SGLang).

VQAScore's contract (docs/methods.md#scorers, arXiv 2404.01291): a sample's score is P("Yes" | media, question), read
here from the ``top_logprobs`` of the first generated token, as Flow-Factory's ``vllm_evaluate.py`` does: the
probabilities of every listed variant of the answer ("Yes", " yes", "YES", ...) are summed, and by default
renormalised against the negative answer, P(yes) / (P(yes) + P(no)). An answer token that is not among the top K
counts as probability 0 (``extras["yes_missing"]`` marks those samples and a warning says how many).

The client uses only the standard library (``urllib`` + ``json``; no ``requests`` dependency). Each sample is one
request, sent concurrently from a bounded thread pool; timeouts, HTTP 5xx/429, dropped connections and
malformed JSON are retried with exponential backoff a bounded number of times, and the final error names the
URL and what failed. Images travel as base64 PNG data URLs inside the message content; a video sends up to
``max_frames`` uniformly spaced frames as consecutive images.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from typing import Any, TypeVar

import torch
from torch import Tensor

from visalign.scorers.base import RawScore, ScoreBatch, Scorer
from visalign.scorers.card import ScorerCard

__all__ = ["RemoteScorerError", "RemoteYesScorer", "first_token_top_logprobs", "yes_probability"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RemoteScorerError(RuntimeError):
    """A request to a remote scorer failed for good (after its retries); the message names the URL and the cause."""


class _Retryable(Exception):
    """A failure worth retrying: timeout, 5xx/429, dropped connection, malformed response."""


def http_post(url: str, data: bytes, *, content_type: str, token: str | None, timeout_s: float,
              refused_hint: str) -> bytes:
    """One POST; the answer's bytes.

    Raises:
        _Retryable: timeouts, HTTP 5xx/429, dropped connections (worth another try).
        RemoteScorerError: any other HTTP error (4xx: the request itself is wrong), naming ``refused_hint``.
    """
    headers = {"Content-Type": content_type, "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        detail = err.read()[:300].decode("utf-8", "replace")
        message = f"HTTP {err.code} {err.reason}: {detail}"
        if err.code >= 500 or err.code == 429:
            raise _Retryable(message) from None
        raise RemoteScorerError(f"POST {url} was refused ({message}); {refused_hint}.") from None
    except (TimeoutError, urllib.error.URLError, HTTPException, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        kind = "timed out" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else "failed"
        raise _Retryable(f"request {kind} after at most {timeout_s:g} s ({type(reason).__name__}: "
                         f"{reason})") from None


def post_with_retries(send: Callable[[], T], *, url: str, max_retries: int, backoff_s: float, max_backoff_s: float,
                      what: str) -> T:
    """``send()`` until it does not raise :class:`_Retryable`, waiting ``backoff_s`` doubled per retry (at most
    ``max_backoff_s``); after ``max_retries`` retries raises :class:`RemoteScorerError` naming the last failure."""
    last = ""
    for attempt in range(max_retries + 1):
        if attempt:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), max_backoff_s))
        try:
            return send()
        except _Retryable as err:
            last = str(err)
            logger.debug("POST %s attempt %d failed: %s", url, attempt + 1, last)
    raise RemoteScorerError(f"POST {url} failed after {max_retries + 1} attempt(s); last error: {last}. Is the "
                            f"server ({what}) running and reachable?")


def _answer_key(token: str) -> str:
    # Tokenisers mark a leading space with "Ġ" (byte-level BPE) or "▁" (SentencePiece); servers may or may not
    # decode them, so "Ġyes", "▁Yes" and " yes" all count as the answer "yes".
    return token.replace("Ġ", " ").replace("▁", " ").strip().casefold()


def first_token_top_logprobs(response: dict[str, Any]) -> list[tuple[str, float]]:
    """The ``(token, logprob)`` alternatives of the first generated token of a chat-completions response.

    Raises:
        ValueError: when the response lacks ``choices[0].logprobs.content[0].top_logprobs`` (server started
            without logprobs support, or not an OpenAI-compatible response).
    """
    try:
        first = response["choices"][0]["logprobs"]["content"][0]
        entries = first["top_logprobs"] or [{"token": first["token"], "logprob": first["logprob"]}]
        return [(str(e["token"]), float(e["logprob"])) for e in entries]
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"response has no choices[0].logprobs.content[0].top_logprobs ({type(err).__name__}: "
                         f"{err}); start the server with logprobs enabled") from None


def yes_probability(alternatives: list[tuple[str, float]], answer: str = "Yes", negative: str = "No",
                    renormalize: bool = True) -> tuple[float, float, float]:
    """P(answer) from the top alternatives of one token.

    Args:
        alternatives: ``(token, logprob)`` pairs, e.g. from :func:`first_token_top_logprobs`.
        answer, negative: the positive and negative answers; every listed token equal to one of them after
            stripping spaces and case-folding contributes its probability.
        renormalize: return P(yes) / (P(yes) + P(no)) instead of P(yes).

    Returns:
        ``(score, p_yes, p_no)``; score is in [0, 1] and 0 when the answer is not listed.
    """
    yes_key, no_key = _answer_key(answer), _answer_key(negative)
    p_yes = sum(math.exp(lp) for tok, lp in alternatives if _answer_key(tok) == yes_key)
    p_no = sum(math.exp(lp) for tok, lp in alternatives if _answer_key(tok) == no_key)
    if not renormalize:
        return min(p_yes, 1.0), p_yes, p_no
    return (p_yes / (p_yes + p_no) if p_yes > 0 else 0.0), p_yes, p_no


def _png_data_url(image: Tensor) -> str:
    """float ``[3, H, W]`` in [0, 1] → ``data:image/png;base64,...``."""
    from visalign.media import to_pil

    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class RemoteYesScorer(Scorer):
    """VQAScore-style P(yes) from a remote OpenAI-compatible server (vLLM / SGLang) with logprobs.

    Card ``weights``: ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``) and ``model`` (the served model name).
    Card ``params`` (all optional):

    - ``template``: question with ``{}`` for the prompt (default VQAScore's); ``answer`` / ``negative``
      ("Yes" / "No"); ``renormalize`` (true: P(yes)/(P(yes)+P(no))); ``top_logprobs`` K (default 20).
    - ``timeout_s`` per request (60), ``max_retries`` after the first try (3), ``backoff_s`` first wait,
      doubled per retry up to ``max_backoff_s`` (0.5, 8), ``max_concurrency`` requests in flight (8).
    - ``max_frames`` sent per video (8); ``api_key_env``: name of an environment variable holding a bearer token.
    - ``requires_server``: documents that scoring needs a running server (tests start a local fake one).

    Raw scores are probabilities in [0, 1]; ``extras``: ``p_yes [B]`` and ``p_no [B]`` (summed, before
    renormalisation), ``yes_missing [B]`` (1.0 where no answer token was among the top K).

    >>> from visalign.scorers import get_scorer
    >>> scorer = get_scorer("remote-vqascore", weights={"base_url": "http://127.0.0.1:8000/v1"})
    >>> scorer.endpoint
    'http://127.0.0.1:8000/v1/chat/completions'
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(card, device=device, dtype=dtype)
        p, w = card.params, card.weights
        where = f"card {card.source or card.id}"
        if not w.get("base_url"):
            raise ValueError(f"Scorer {card.id!r} needs weights.base_url (e.g. http://127.0.0.1:8000/v1) in {where}, "
                             "or get_scorer(..., weights={'base_url': ...}).")
        self.base_url = str(w["base_url"]).rstrip("/")
        self.model = str(w.get("model", ""))
        self.template = str(p.get("template", 'Does this figure show "{}"? Please answer Yes or No.'))
        self.answer, self.negative = str(p.get("answer", "Yes")), str(p.get("negative", "No"))
        self.renormalize = bool(p.get("renormalize", True))
        self.top_logprobs = int(p.get("top_logprobs", 20))
        self.timeout_s = float(p.get("timeout_s", 60.0))
        self.max_retries = int(p.get("max_retries", 3))
        self.backoff_s = float(p.get("backoff_s", 0.5))
        self.max_backoff_s = float(p.get("max_backoff_s", 8.0))
        self.max_concurrency = int(p.get("max_concurrency", 8))
        self.max_frames = int(p.get("max_frames", 8))
        self.api_key_env = p.get("api_key_env")
        for name in ("top_logprobs", "max_concurrency", "max_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"params.{name} in {where} must be >= 1; got {getattr(self, name)}.")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise ValueError(f"params in {where} need timeout_s > 0, max_retries >= 0 and backoff_s >= 0.")

    @property
    def endpoint(self) -> str:
        return f"{self.base_url}/chat/completions"

    # ------------------------------------------------------------------ requests

    def build_request(self, images: list[str], prompt: str) -> dict[str, Any]:
        """The chat-completions body for one sample: its images (data URLs) then the question.

        Only the first token is generated (``max_tokens: 1``, greedy): its logprobs are the score.
        """
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in images]
        content.append({"type": "text", "text": self.template.format(prompt)})
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 1,
                "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs}

    def _post_once(self, data: bytes) -> dict[str, Any]:
        token = os.environ.get(str(self.api_key_env)) if self.api_key_env else None
        body = http_post(self.endpoint, data, content_type="application/json", token=token, timeout_s=self.timeout_s,
                         refused_hint=f"check weights.model ({self.model!r}) and the server's logs")
        try:
            parsed = json.loads(body)
            first_token_top_logprobs(parsed)  # validate here, so a malformed answer is retried like a 5xx
        except ValueError as err:
            raise _Retryable(f"malformed response ({err}): {body[:200]!r}") from None
        return parsed

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the endpoint, retrying retryable failures with exponential backoff.

        Raises:
            RemoteScorerError: naming the URL, the number of attempts and the last failure.
        """
        data = json.dumps(body).encode("utf-8")
        return post_with_retries(lambda: self._post_once(data), url=self.endpoint, max_retries=self.max_retries,
                                 backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s,
                                 what=f"model {self.model!r}")

    def score_one(self, images: list[str], prompt: str) -> tuple[float, float, float]:
        """(score, p_yes, p_no) of one sample given its images as data URLs."""
        alternatives = first_token_top_logprobs(self.post(self.build_request(images, prompt)))
        return yes_probability(alternatives, self.answer, self.negative, self.renormalize)

    # ------------------------------------------------------------------ the contract

    def _sample_images(self, media: Tensor) -> list[str]:
        """One sample (``[3, H, W]`` or ``[T, 3, H, W]``) → PNG data URLs (uniformly spaced frames of a video)."""
        if media.ndim == 3:
            return [_png_data_url(media)]
        index = torch.linspace(0, media.shape[0] - 1, min(media.shape[0], self.max_frames)).round().long()
        return [_png_data_url(media[i]) for i in index]

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        media = batch.media.detach().float().cpu()
        images = [self._sample_images(media[i]) for i in range(len(batch))]
        workers = min(self.max_concurrency, len(batch))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="visalign-remote")
        try:
            futures = [pool.submit(self.score_one, imgs, prompt)
                       for imgs, prompt in zip(images, batch.prompts, strict=True)]
            results = [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on failure, queued samples are not sent at all
        scores, p_yes, p_no = torch.tensor(results, dtype=torch.float64).float().unbind(1)  # [B, 3] → 3 × [B]
        missing = (p_yes == 0).float()
        if missing.any():
            logger.warning("Scorer %r: the answer %r was not among the top %d tokens for %d of %d samples; their "
                           "score is 0.", self.id, self.answer, self.top_logprobs, int(missing.sum()), len(batch))
        return RawScore(scores, {"p_yes": p_yes, "p_no": p_no, "yes_missing": missing})


class ServedScorer(Scorer):
    """A scorer served by ``visalign serve`` (docs/serving.md#schema), called over HTTP.

    Card ``weights``: ``base_url`` (``http://127.0.0.1:8100``) and ``scorer`` (the served id; may be left out when
    the server serves one). Card ``params``: ``token_env`` (an environment variable holding the bearer token),
    ``timeout_s`` (60), ``max_retries`` (3), ``backoff_s`` (0.5), ``max_backoff_s`` (8), ``max_batch`` samples per
    request (64; larger batches are split), ``encoding`` (``safetensors``, exact float32; or ``png``, 8-bit).

    ``raw`` is the server's normalised reward (so the card's normalisation is the identity); ``extras`` carry the
    served scorer's ``[B]`` extras and ``native`` (the served scorer's own raw value). Connection failures and 5xx
    answers are retried with backoff; the final error names the URL.
    """

    def __init__(self, card: ScorerCard, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(card, device=device, dtype=dtype)
        from visalign.scorers.wire import JSON, SAFETENSORS

        p, w = card.params, card.weights
        where = f"card {card.source or card.id}"
        if not w.get("base_url"):
            raise ValueError(f"Scorer {card.id!r} needs weights.base_url (the `visalign serve` address, e.g. "
                             f"http://127.0.0.1:8100) in {where}.")
        self.base_url = str(w["base_url"]).rstrip("/")
        self.served = w.get("scorer")
        self.token_env = p.get("token_env")
        self.timeout_s = float(p.get("timeout_s", 60.0))
        self.max_retries = int(p.get("max_retries", 3))
        self.backoff_s = float(p.get("backoff_s", 0.5))
        self.max_backoff_s = float(p.get("max_backoff_s", 8.0))
        self.max_batch = int(p.get("max_batch", 64))
        encodings = {"safetensors": SAFETENSORS, "png": JSON}
        if p.get("encoding", "safetensors") not in encodings:
            raise ValueError(f"params.encoding in {where} is {p.get('encoding')!r}; use one of {sorted(encodings)}.")
        self.content_type = encodings[p.get("encoding", "safetensors")]
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0 or self.max_batch < 1:
            raise ValueError(f"params in {where} need timeout_s > 0, max_retries >= 0, backoff_s >= 0 and "
                             "max_batch >= 1.")

    @property
    def endpoint(self) -> str:
        return f"{self.base_url}/v1/score"

    def _post(self, data: bytes, size: int) -> Any:
        from visalign.scorers.wire import WireError, decode_answer

        token = os.environ.get(str(self.token_env)) if self.token_env else None

        def send() -> Any:
            body = http_post(self.endpoint, data, content_type=self.content_type, token=token,
                             timeout_s=self.timeout_s, refused_hint="check weights.scorer, the token "
                             f"(params.token_env={self.token_env!r}) and the server's log")
            try:
                return decode_answer(body, size)
            except WireError as err:
                raise _Retryable(f"malformed answer ({err})") from None

        return post_with_retries(send, url=self.endpoint, max_retries=self.max_retries, backoff_s=self.backoff_s,
                                 max_backoff_s=self.max_backoff_s, what=f"visalign serve, scorer {self.served!r}")

    def score_raw(self, batch: ScoreBatch) -> RawScore:
        from visalign.scorers.wire import ScoreRequest, encode_request

        media = batch.media.detach().float().cpu()
        rewards, natives, extras = [], [], []
        for start in range(0, len(batch), self.max_batch):
            part = slice(start, start + self.max_batch)
            request = ScoreRequest(prompts=batch.prompts[part], media=media[part], scorer=self.served,
                                   metadata=batch.metadata[part] if batch.metadata is not None else None)
            answer = self._post(encode_request(request, self.content_type), len(request.prompts))
            rewards.append(answer.reward)
            natives.append(answer.raw)
            extras.append(answer.extras)
        keys = set(extras[0]).intersection(*extras[1:]) if extras else set()
        out = {k: torch.cat([e[k] for e in extras]) for k in sorted(keys)}
        out["native"] = torch.cat(natives)
        return RawScore(torch.cat(rewards), out)
