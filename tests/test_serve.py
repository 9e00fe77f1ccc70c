"""``visalign serve`` on 127.0.0.1 with real sockets: concurrent clients are batched and all answered, bad bodies
are refused with 4xx and the server keeps serving, and ServedScorer reads it (docs/serving.md)."""

from __future__ import annotations

import json
import logging
import pickle
import threading
import urllib.error
import urllib.request

import pytest
import torch

from visalign.scorers import ScoreBatch, get_scorer
from visalign.scorers.remote import RemoteScorerError
from visalign.scorers.wire import JSON, SAFETENSORS, ScoreRequest, decode_answer, encode_request
from visalign.serving.server import RewardServer, ServeConfig

TOKEN = "s3cret-token"


@pytest.fixture
def server():
    scorers = {"brightness": get_scorer("brightness"), "saturation": get_scorer("saturation")}
    srv = RewardServer(scorers, ServeConfig(port=0, token=TOKEN, max_body_bytes=200_000, max_batch=64,
                                            max_wait_s=0.02)).start()
    yield srv
    srv.stop()


def post(url: str, body: bytes, content_type: str, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + "/v1/score", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def media(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_eight_concurrent_clients_times_fifty_requests_are_all_answered_in_batches(server, caplog):
    caplog.set_level(logging.INFO, logger="visalign.serving.server")
    expected = get_scorer("brightness")
    errors: list[str] = []

    def client(k: int) -> None:
        for i in range(50):
            m = media(2, seed=1000 * k + i)
            body = encode_request(ScoreRequest(prompts=["a", "b"], media=m, scorer="brightness"), SAFETENSORS)
            status, answer = post(server.url, body, SAFETENSORS)
            want = expected(ScoreBatch(prompts=["a", "b"], media=m)).reward.tolist()
            if status != 200 or answer["reward"] != pytest.approx(want, abs=1e-6):
                errors.append(f"client {k} request {i}: {status} {answer}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    stats = server.health()
    assert stats["requests"] == 400
    assert stats["max_batch_requests"] > 1, stats  # concurrent requests shared a forward pass
    assert stats["batches"] < 400
    logged = [r.getMessage() for r in caplog.records if "scored a batch" in r.getMessage()]
    assert any(int(m.split(" from ")[1].split()[0]) > 1 for m in logged), logged[:5]


def test_bad_requests_are_refused_with_4xx_and_the_server_keeps_serving(server):
    good = encode_request(ScoreRequest(prompts=["a"], media=media(1, 0)), SAFETENSORS)

    def still_serves() -> None:
        status, answer = post(server.url, encode_request(ScoreRequest(prompts=["x"], media=media(1, 1),
                                                                      scorer="saturation"), JSON), JSON)
        assert status == 200 and len(answer["reward"]) == 1

    two_images = json.loads(encode_request(ScoreRequest(prompts=["a", "b"], media=media(2, 0),
                                                        scorer="brightness"), JSON))
    cases = {
        "malformed json": (b"{not json", JSON, TOKEN, 400),
        "json without images": (json.dumps({"prompts": ["a"]}).encode(), JSON, TOKEN, 400),
        "truncated safetensors": (good[:40], SAFETENSORS, TOKEN, 400),
        "prompt count mismatch": (json.dumps({**two_images, "prompts": ["a"]}).encode(), JSON, TOKEN, 400),
        "not png": (json.dumps({**two_images, "images": ["aGVsbG8="] * 2}).encode(), JSON, TOKEN, 400),
        "oversized": (encode_request(ScoreRequest(prompts=["a"] * 300, media=media(300, 0), scorer="brightness")),
                      SAFETENSORS, TOKEN, 413),
        "no token": (good, SAFETENSORS, None, 401),
        "wrong token": (good, SAFETENSORS, "guess", 401),
        "pickle": (pickle.dumps({"prompts": ["a"], "media": media(1, 0)}), "application/python-pickle", TOKEN, 415),
        "pickle posing as safetensors": (pickle.dumps(media(1, 0)), SAFETENSORS, TOKEN, 400),
        "pickle posing as json": (pickle.dumps([1, 2]), JSON, TOKEN, 400),
        "unknown scorer": (encode_request(ScoreRequest(prompts=["a"], media=media(1, 0), scorer="nope")),
                           SAFETENSORS, TOKEN, 404),
        "ambiguous scorer": (good, SAFETENSORS, TOKEN, 400),  # two are served and the request names neither
    }
    for name, (body, kind, token, want) in cases.items():
        status, answer = post(server.url, body, kind, token)
        assert status == want, (name, status, answer)
        assert "error" in answer, name
        if name == "prompt count mismatch":
            assert "prompts must be 2 strings" in answer["error"]
        still_serves()
    refused = server.health()["refused"]
    assert sum(refused.values()) == len(cases)


def test_health_needs_the_token_and_lists_the_scorers(server):
    request = urllib.request.Request(server.url + "/health", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["scorers"] == ["brightness", "saturation"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url + "/health", timeout=10)
    assert err.value.code == 401


def test_served_scorer_matches_the_local_scorer_and_splits_large_batches(server, monkeypatch):
    monkeypatch.setenv("VISALIGN_TEST_TOKEN", TOKEN)
    batch = ScoreBatch(prompts=[f"p{i}" for i in range(5)], media=media(5, 3))
    local = get_scorer("saturation")(batch)
    for encoding, atol in (("safetensors", 1e-6), ("png", 0.01)):
        remote = get_scorer("remote-served", weights={"base_url": server.url, "scorer": "saturation"},
                            params={"token_env": "VISALIGN_TEST_TOKEN", "max_batch": 2, "encoding": encoding})
        out = remote(batch)
        torch.testing.assert_close(out.reward, local.reward, atol=atol, rtol=0)
        torch.testing.assert_close(out.extras["native"], local.raw, atol=atol, rtol=0)
    answer = decode_answer(json.dumps({"scorer": "s", "reward": [None], "raw": [0.5]}).encode(), 1)
    assert torch.isnan(answer.reward[0]) and answer.raw[0] == 0.5  # null is NaN ("does not apply")


def test_served_scorer_wrong_token_fails_at_once_and_a_dead_server_after_retries(server, monkeypatch):
    monkeypatch.setenv("VISALIGN_TEST_TOKEN", "wrong")
    batch = ScoreBatch(prompts=["a"], media=media(1, 0))
    remote = get_scorer("remote-served", weights={"base_url": server.url, "scorer": "brightness"},
                        params={"token_env": "VISALIGN_TEST_TOKEN", "max_retries": 3, "backoff_s": 0.01})
    with pytest.raises(RemoteScorerError, match="401"):
        remote(batch)
    url = server.url
    server.stop()
    dead = get_scorer("remote-served", weights={"base_url": url, "scorer": "brightness"},
                      params={"max_retries": 2, "backoff_s": 0.01, "timeout_s": 2})
    with pytest.raises(RemoteScorerError, match="after 3 attempt"):
        dead(batch)


def test_a_failing_scorer_answers_500_and_the_next_batch_is_scored():
    class FailsOnce:
        calls = 0

        def __call__(self, media, prompts, **kwargs):
            FailsOnce.calls += 1
            if FailsOnce.calls == 1:
                raise RuntimeError("transient")
            return media.flatten(1).mean(1)

    srv = RewardServer({"flaky": get_scorer(FailsOnce())}, ServeConfig(port=0)).start()
    try:
        body = encode_request(ScoreRequest(prompts=["a"], media=media(1, 0)))
        status, answer = post(srv.url, body, SAFETENSORS, None)
        assert status == 500 and "transient" in answer["error"]
        flaky = get_scorer("remote-served", weights={"base_url": srv.url}, params={"backoff_s": 0.01})
        out = flaky(ScoreBatch(prompts=["a"], media=media(1, 0)))
        assert out.reward[0].item() == pytest.approx(media(1, 0).mean().item(), abs=1e-6)
    finally:
        srv.stop()


def test_a_recipe_deployment_over_http_gives_the_local_scorers_rewards(tmp_path):
    from tests.generators.conftest import build_sd
    from tests.train.conftest import FAST, TINY_RECIPE
    from visalign.train.config import load_train_config
    from visalign.train.logging import read_metrics
    from visalign.train.loop import Trainer

    torch.set_num_threads(1)
    model = build_sd(tmp_path / "sd")
    srv = RewardServer({"brightness": get_scorer("brightness")}, ServeConfig(port=0)).start()
    try:
        common = [*FAST, f"model.model={model}", "eval.prompts=null", "run.iterations=2"]
        Trainer(load_train_config(TINY_RECIPE, [*common, f"run.output_dir={tmp_path / 'local'}"])).run()
        served = [*common, f"run.output_dir={tmp_path / 'http'}", "reward.terms=['@judge']",
                  f"reward.deployments={{judge: {{kind: http, url: '{srv.url}', scorer: brightness}}}}"]
        Trainer(load_train_config(TINY_RECIPE, served)).run()
        assert srv.health()["requests"] >= 2
    finally:
        srv.stop()
    local, remote = read_metrics(tmp_path / "local"), read_metrics(tmp_path / "http")
    assert [r["reward"] for r in remote] == pytest.approx([r["reward"] for r in local], abs=1e-6)
    assert "reward/judge/mean" in remote[0]
    with pytest.raises(ValueError, match="does not define"):
        Trainer(load_train_config(TINY_RECIPE, [*common, f"run.output_dir={tmp_path / 'x'}",
                                                "reward.terms=['@nope']"]))


def test_the_serve_command_prints_its_url_serves_and_stops_on_sigint(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "VISALIGN_TEST_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "visalign", "serve", "--scorer", "brightness,saturation", "--port",
                             "0", "--token-env", "VISALIGN_TEST_TOKEN"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving ['brightness', 'saturation'] on http://127.0.0.1:"), line
        url = line.split(" on ")[1].split()[0]
        status, answer = post(url, encode_request(ScoreRequest(prompts=["a"], media=media(1, 0),
                                                               scorer="brightness")), SAFETENSORS)
        assert status == 200 and len(answer["reward"]) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    missing = subprocess.run([sys.executable, "-m", "visalign", "serve", "--scorer", "brightness", "--token-env",
                              "VISALIGN_UNSET_TOKEN_VAR"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "unset or empty" in missing.stderr
