"""RemoteYesScorer against a real local HTTP server (127.0.0.1, port 0) that fakes an OpenAI-compatible VLM.

Every test is bounded by a few seconds: client timeouts are fractions of a second, backoff is 10 ms, and the
server wakes any delayed handler when it stops.
"""

from __future__ import annotations

import base64
import io
import logging
import socket
import time

import pytest
import torch
from PIL import Image

from tests.tiny.remote import FakeBehaviour, FakeYesServer, fake_p_yes
from visalign.media import pil_to_tensor
from visalign.scorers import ScoreBatch, get_scorer
from visalign.scorers.remote import RemoteScorerError, RemoteYesScorer, yes_probability

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a cyan star", "a big moon", "three dots"]


@pytest.fixture
def serve():
    started: list[FakeYesServer] = []

    def start(**behaviour) -> FakeYesServer:
        server = FakeYesServer(FakeBehaviour(**behaviour)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def remote_scorer(base_url: str, **params):
    defaults = {"timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.01}
    return get_scorer("remote-vqascore", weights={"base_url": base_url, "model": "fake-vlm"},
                      params={**defaults, **params})


def batch(n: int = 3, seed: int = 0) -> ScoreBatch:
    media = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return ScoreBatch(prompts=PROMPTS[:n], media=media)


def question_of(body) -> str:
    return body["messages"][-1]["content"][-1]["text"]


def test_p_yes_is_read_exactly_from_the_first_tokens_top_logprobs(serve):
    server = serve()
    b = batch(3)
    out = remote_scorer(server.base_url)(b)
    assert server.requests == 3  # one request per sample
    by_question = {question_of(body): body for body in server.bodies}
    for i, prompt in enumerate(b.prompts):
        body = by_question[f'Does this figure show "{prompt}"? Please answer Yes or No.']
        assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
        assert body["model"] == "fake-vlm"
        url = body["messages"][-1]["content"][0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        sent = pil_to_tensor(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
        torch.testing.assert_close(sent, b.media[i], atol=1 / 255, rtol=0)  # the sample's own pixels, as PNG
        p = fake_p_yes(body["messages"][-1]["content"])
        assert out.raw[i].item() == pytest.approx(p, abs=1e-6)  # (0.8 + 0.1)·p / 0.9 renormalised back to p
        assert out.extras["p_yes"][i].item() == pytest.approx(0.9 * p, abs=1e-6)
        assert out.extras["p_no"][i].item() == pytest.approx(0.9 * (1 - p), abs=1e-6)
    torch.testing.assert_close(out.reward, out.raw)  # Prob() normalisation
    assert out.extras["yes_missing"].sum() == 0


def test_unrenormalised_score_and_top_k_are_taken_from_the_card_params(serve):
    server = serve()
    out = remote_scorer(server.base_url, renormalize=False, top_logprobs=3)(batch(2))
    for i, body in enumerate(sorted(server.bodies, key=lambda b: PROMPTS.index(question_of(b).split('"')[1]))):
        assert body["top_logprobs"] == 3
        # with K = 3 the server lists only its three most likely tokens; whichever yes variants are among them count
        p = fake_p_yes(body["messages"][-1]["content"])
        listed = sorted([("Yes", 0.8 * p), (" yes", 0.1 * p), ("No", 0.8 * (1 - p)), ("no", 0.1 * (1 - p)),
                         ("Maybe", 0.1)], key=lambda t: -t[1])[:3]
        expected = sum(q for tok, q in listed if tok.strip().lower() == "yes")
        assert out.raw[i].item() == pytest.approx(expected, abs=1e-6)


def test_missing_yes_token_scores_zero_with_a_note(serve, caplog):
    server = serve(no_yes_token=True)
    with caplog.at_level(logging.WARNING, logger="visalign.scorers.remote"):
        out = remote_scorer(server.base_url)(batch(2))
    assert out.raw.tolist() == [0.0, 0.0] and out.extras["yes_missing"].tolist() == [1.0, 1.0]
    assert "not among the top 20 tokens for 2 of 2 samples" in caplog.text


def test_timeouts_are_retried_then_fail_clearly_without_hanging(serve):
    server = serve(delay_s=5.0)
    scorer = remote_scorer(server.base_url, timeout_s=0.2, max_retries=1)
    start = time.monotonic()
    with pytest.raises(RemoteScorerError) as err:
        scorer(batch(1))
    assert time.monotonic() - start < 2.0
    assert server.requests == 2  # the first try and one retry
    assert f"{server.base_url}/chat/completions" in str(err.value) and "timed out" in str(err.value)
    assert "after 2 attempt(s)" in str(err.value)


def test_malformed_json_is_retried_and_succeeds_on_the_next_response(serve):
    server = serve(malformed_first=1)
    out = remote_scorer(server.base_url)(batch(1))
    assert server.requests == 2
    assert out.raw[0].item() == pytest.approx(fake_p_yes(server.bodies[-1]["messages"][-1]["content"]), abs=1e-6)


def test_always_malformed_json_fails_clearly_after_the_last_retry(serve):
    server = serve(always_malformed=True)
    with pytest.raises(RemoteScorerError, match=r"chat/completions failed after 3 attempt\(s\).*malformed"):
        remote_scorer(server.base_url, max_retries=2)(batch(1))
    assert server.requests == 3


def test_http_500_is_retried_and_succeeds(serve):
    server = serve(fail_first=2)
    out = remote_scorer(server.base_url, max_retries=2)(batch(1))
    assert server.requests == 3 and 0.05 <= out.raw[0].item() <= 0.95


def test_persistent_http_500_fails_clearly(serve):
    server = serve(fail_first=100)
    with pytest.raises(RemoteScorerError, match="HTTP 500") as err:
        remote_scorer(server.base_url, max_retries=1)(batch(1))
    assert server.base_url in str(err.value) and server.requests == 2


def test_client_errors_are_not_retried(serve):
    server = serve()
    with pytest.raises(RemoteScorerError, match="HTTP 404.*refused|refused.*HTTP 404"):
        remote_scorer(server.base_url.replace("/v1", "/v2"))(batch(1))
    assert server.requests == 1


def test_unreachable_server_fails_after_bounded_retries():
    with socket.socket() as sock:  # a port that nothing listens on once this socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(RemoteScorerError, match=f"127.0.0.1:{port}/v1/chat/completions failed after 2"):
        remote_scorer(f"http://127.0.0.1:{port}/v1", max_retries=1, timeout_s=0.5)(batch(1))
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("limit", [1, 2])
def test_concurrency_is_bounded_by_max_concurrency(serve, limit):
    server = serve(hold_s=0.15)
    start = time.monotonic()
    out = remote_scorer(server.base_url, max_concurrency=limit)(batch(6))
    assert out.raw.shape == (6,)
    assert server.max_in_flight == limit  # requests overlap (limit 2) but never beyond the limit
    assert time.monotonic() - start >= 6 / limit * 0.15 - 0.05


@pytest.mark.parametrize("alternatives,renormalize,expected", [
    ([("Yes", -0.5), ("No", -1.5)], True, 1 / (1 + torch.e ** -1.0)),
    ([("Yes", -0.5), ("No", -1.5)], False, torch.e ** -0.5),
    ([("Yes", -1.0), (" yes", -2.0), ("ĠYES", -3.0), ("▁No", -1.0)], False,
     torch.e ** -1.0 + torch.e ** -2.0 + torch.e ** -3.0),
    ([("No", -0.1), ("Maybe", -2.0)], True, 0.0),  # yes missing: 0
    ([("Maybe", -0.1)], True, 0.0),  # neither listed: 0, not 0/0
    ([("yes", -0.2)], True, 1.0),  # no "No" listed: all the listed answer mass is yes
    ([("Yesterday", -0.1), ("No", -1.0)], True, 0.0),  # a prefix is not the answer
])
def test_yes_probability_table(alternatives, renormalize, expected):
    assert yes_probability(alternatives, renormalize=renormalize)[0] == pytest.approx(expected, abs=1e-9)


def decode_data_url(url: str) -> torch.Tensor:
    return pil_to_tensor(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_video_card_sends_uniformly_spaced_frames_in_one_request(serve):
    server = serve()
    image_card = remote_scorer(server.base_url, max_frames=4).card
    scorer = RemoteYesScorer(image_card.with_overrides(modality="video"))
    video = torch.rand(1, 10, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    out = scorer(ScoreBatch(prompts=["a moving dot"], media=video))
    assert server.requests == 1
    parts = server.bodies[0]["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 4 + ["text"]
    torch.testing.assert_close(decode_data_url(parts[0]["image_url"]["url"]), video[0, 0], atol=1 / 255, rtol=0)
    torch.testing.assert_close(decode_data_url(parts[3]["image_url"]["url"]), video[0, 9], atol=1 / 255, rtol=0)
    assert out.raw[0].item() == pytest.approx(fake_p_yes(parts), abs=1e-6)


def test_image_card_scores_a_video_frame_by_frame(serve):
    server = serve()
    video = torch.rand(1, 3, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    out = remote_scorer(server.base_url)(ScoreBatch(prompts=["a moving dot"], media=video))
    assert server.requests == 3  # the base contract: an image scorer averages its per-frame scores
    expected = sum(fake_p_yes(body["messages"][-1]["content"]) for body in server.bodies) / 3
    assert out.raw[0].item() == pytest.approx(expected, abs=1e-6)


def test_missing_base_url_is_a_clear_error():
    with pytest.raises(ValueError, match="weights.base_url"):
        get_scorer("remote-vqascore", weights={"base_url": ""})
