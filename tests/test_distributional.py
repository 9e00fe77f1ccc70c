"""Distributional (exemplar-set) rewards: set metrics against reference formulas, the statistics cache, the scorer.

The metric tests compare against independent computations (scipy's ``sqrtm`` formula as in pytorch-fid, the
n × n kernel's eigenvalues, a double loop, brute-force leave-one-out); the scorer tests check behaviour a
plausible bug would break (exemplars score above noise, set values agree with the metric functions).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from visalign.media import list_images, save_image, to_image_batch
from visalign.scorers import ScoreBatch, get_scorer
from visalign.scorers.distributional import CACHE_STATS, ExemplarSet
from visalign.scorers.embedders import ColorHistogramEmbedder, embed_media, resolve_embedder
from visalign.scorers.set_metrics import (
    covariance,
    frechet_distance,
    frechet_distance_to_reference,
    leave_one_out_frechet,
    leave_one_out_vendi,
    mmd2_unbiased,
    mmd_witness,
    psd_sqrt,
    rbf_kernel,
    vendi_score,
)

COLORS = Path(__file__).resolve().parents[1] / "assets" / "exemplars" / "colors"


def gaussian_sets(d: int, n_ref: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n_ref, d, generator=g, dtype=torch.float64) @ (0.3 * torch.randn(d, d, generator=g,
                                                                                        dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5
    mu, cov = ref.mean(0), covariance(ref)
    return x, mu, cov, psd_sqrt(*torch.linalg.eigh(cov))


# ------------------------------------------------------------------------------------------------ set metrics


def test_frechet_distance_matches_scipy_sqrtm_formula():
    g = torch.Generator().manual_seed(1)
    d, n = 64, 500
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, d, generator=g, dtype=torch.float64) @ (0.2 * torch.randn(d, d, generator=g,
                                                                                   dtype=torch.float64)) + 0.1
    m1, c1, m2, c2 = (t.numpy() for t in (x.mean(0), covariance(x), y.mean(0), covariance(y)))
    expected = ((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2).real)
    ours = frechet_distance(x.mean(0), covariance(x), y.mean(0), covariance(y)).item()
    assert ours == pytest.approx(expected, rel=1e-3)
    # the cached-reference route (Σ_ref^{1/2} reused) agrees with the general one, in both the primal and dual form
    root = psd_sqrt(*torch.linalg.eigh(covariance(y)))
    for rows in (500, 20):  # n > d: D×D matrix; n < d: N×N Gram
        direct = frechet_distance(x[:rows].mean(0), covariance(x[:rows]), y.mean(0), covariance(y)).item()
        via_ref = frechet_distance_to_reference(x[:rows], y.mean(0), covariance(y), root).item()
        assert via_ref == pytest.approx(direct, rel=1e-9)
    assert frechet_distance(y.mean(0), covariance(y), y.mean(0), covariance(y)).item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("d,n", [(6, 12), (16, 7)], ids=["rank-one-DxD", "gram-NxN"])
def test_leave_one_out_fd_credit_equals_brute_force(d, n):
    x, mu, cov, root = gaussian_sets(d, 40, n)
    delta, full = leave_one_out_frechet(x, mu, cov, root)
    fd = lambda s: frechet_distance(s.mean(0), covariance(s), mu, cov)  # noqa: E731
    brute = torch.stack([fd(torch.cat([x[:i], x[i + 1:]])) for i in range(n)]) - fd(x)
    torch.testing.assert_close(delta, brute, atol=1e-9, rtol=1e-9)
    assert full.item() == pytest.approx(fd(x).item(), rel=1e-9)
    assert delta.abs().max() > 1e-3  # the test would pass vacuously if every credit were 0


def test_vendi_equals_entropy_of_the_direct_kernel_eigenvalues():
    g = torch.Generator().manual_seed(2)
    for d, n in [(5, 30), (40, 12)]:  # d < n uses the dual d × d form
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        xn = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
        lam = np.linalg.eigvalsh(xn @ xn.T / n)
        lam = lam[lam > 1e-12]
        assert vendi_score(x).item() == pytest.approx(np.exp(-(lam * np.log(lam)).sum()), rel=1e-9)
    assert vendi_score(torch.ones(6, 4)).item() == pytest.approx(1.0, abs=1e-9)  # identical samples: one
    assert vendi_score(torch.eye(5)).item() == pytest.approx(5.0, rel=1e-9)  # orthogonal samples: all distinct


def test_leave_one_out_vendi_credits_the_distinct_sample():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # two duplicates and one distinct sample
    delta, full = leave_one_out_vendi(x)
    assert full.item() == pytest.approx(vendi_score(x).item())
    assert delta[2] > delta[0] and delta[0] == pytest.approx(delta[1].item())


def test_mmd2_unbiased_and_witness_match_double_loops():
    g = torch.Generator().manual_seed(3)
    x, y, sigma = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g) + 0.7, 0.9

    def k(a, b):
        return float(np.exp(-float(((a - b) ** 2).sum()) / (2 * sigma**2)))

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert mmd2_unbiased(x, y, sigma).item() == pytest.approx(xx + yy - 2 * xy, rel=1e-5)
    witness = [sum(k(x[i], y[j]) for j in range(n)) / n - sum(k(x[i], x[j]) for j in range(m) if j != i) / (m - 1)
               for i in range(m)]
    np.testing.assert_allclose(mmd_witness(x, y, sigma).numpy(), witness, rtol=1e-5, atol=1e-7)
    assert rbf_kernel(x, x, sigma).diagonal().allclose(torch.ones(m))


# ------------------------------------------------------------------------------------------------ exemplar sets


class CountingColorEmbedder(ColorHistogramEmbedder):
    """The real colour embedder, counting how many images it embeds (to prove a cache hit embeds nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.images_embedded = 0

    def embed_images(self, media):
        self.images_embedded += media.shape[0]
        return super().embed_images(media)


def test_exemplar_statistics_are_cached_by_encoder_and_content(tmp_path):
    folder = tmp_path / "colors"
    shutil.copytree(COLORS, folder)
    embedder, cache = CountingColorEmbedder(), tmp_path / "cache"
    before = CACHE_STATS.copy()
    first = ExemplarSet.build(folder, embedder, cache_dir=cache)
    assert not first.from_cache and embedder.images_embedded == 12 and len(list(cache.glob("*.safetensors"))) == 1
    second = ExemplarSet.build(folder, embedder, cache_dir=cache)
    assert second.from_cache and embedder.images_embedded == 12  # read back, nothing embedded again
    assert CACHE_STATS["hit"] - before["hit"] == 1 and CACHE_STATS["miss"] - before["miss"] == 1
    for name in ("embeddings", "mean", "cov", "cov_eigvals", "cov_eigvecs"):
        torch.testing.assert_close(getattr(second, name), getattr(first, name), atol=0, rtol=0)
    assert first.mean.dtype == torch.float64 and first.cov.shape == (first.embeddings.shape[1],) * 2
    # the eigendecomposition reproduces Σ_ref, so the cached square root is Σ_ref^{1/2}
    torch.testing.assert_close(second.cov_sqrt @ second.cov_sqrt, first.cov, atol=1e-10, rtol=0)

    save_image(torch.rand(3, 32, 32), folder / "12-noise.png")  # new content: a new key, not a stale hit
    third = ExemplarSet.build(folder, embedder, cache_dir=cache)
    assert not third.from_cache and len(third) == 13
    other = ExemplarSet.build(folder, ColorHistogramEmbedder(bins=4), cache_dir=cache)  # another encoder id
    assert not other.from_cache and other.embeddings.shape[1] == 3 * 4 + 12


def test_cache_dir_defaults_to_visalign_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VISALIGN_CACHE", str(tmp_path / "vc"))
    ExemplarSet.build(COLORS, ColorHistogramEmbedder())
    assert list((tmp_path / "vc" / "exemplars").glob("color-histogram-*.safetensors"))


def test_text_exemplars_need_an_embedder_with_a_text_side(tmp_path):
    with pytest.raises(TypeError, match="no text side.*embed_texts"):
        ExemplarSet.build(["a red circle", "a blue square"], ColorHistogramEmbedder(), cache_dir=tmp_path)


def test_text_exemplars_through_clip_score_images_cross_modally(tmp_path, build_tiny_scorer):
    pytest.importorskip("tests.tiny.clip", reason="the tiny CLIP builder (tests/tiny/clip.py) is not available")
    scorer = build_tiny_scorer("exemplar-centroid-clip-b32")
    scorer = get_scorer("exemplar-centroid-clip-b32", params={**scorer.card.params, "cache_dir": str(tmp_path)})
    images = to_image_batch(list_images(COLORS)[:3])
    out = scorer(ScoreBatch(prompts=["x"] * 3, media=images))
    clip = scorer._embedder.scorer  # the tiny CLIP scorer behind the embedder
    texts = clip.embed_texts(list(scorer.card.params["exemplars"]))
    expected = torch.nn.functional.cosine_similarity(clip.embed_images(images), texts.mean(0, keepdim=True), dim=-1)
    torch.testing.assert_close(out.raw, expected, atol=1e-5, rtol=0)
    assert scorer.exemplars.embeddings.shape[0] == len(scorer.card.params["exemplars"])


# ------------------------------------------------------------------------------------------------ the scorer


def colour_scorer(name: str, tmp_path: Path, **params):
    return get_scorer(name, params={"cache_dir": str(tmp_path), **params})


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["exemplar-centroid-color", "exemplar-knn-color"])
def test_pointwise_exemplar_rewards_prefer_exemplar_like_images(name, tmp_path):
    scorer = colour_scorer(name, tmp_path)
    exemplar_like = to_image_batch(list_images(COLORS)[:4])
    out_ex = scorer(ScoreBatch(prompts=["x"] * 4, media=exemplar_like))
    out_noise = scorer(ScoreBatch(prompts=["x"] * 4, media=noise(4)))
    assert out_ex.raw.min() > out_noise.raw.max() + 0.2
    assert ((out_ex.reward >= 0) & (out_ex.reward <= 1)).all()


def test_fd_change_scorer_credits_the_sample_that_pulls_towards_the_exemplars(tmp_path):
    scorer = colour_scorer("exemplar-fd-color", tmp_path)
    media = torch.cat([noise(5), to_image_batch(list_images(COLORS)[3:4])])
    out = scorer(ScoreBatch(prompts=["x"] * 6, media=media))
    assert out.raw.argmax().item() == 5  # the one exemplar-like image among noise helps the batch FD most
    ref = scorer.exemplars
    emb = embed_media(ColorHistogramEmbedder(), media)
    direct = frechet_distance(emb.double().mean(0), covariance(emb), ref.mean, ref.cov)
    assert out.extras["set_value"].ndim == 0
    assert out.extras["set_value"].item() == pytest.approx(direct.item(), rel=1e-4)
    with pytest.raises(ValueError, match="at least 3"):
        scorer(ScoreBatch(prompts=["x"] * 2, media=media[:2]))


def test_vendi_and_mmd_scorers_report_their_set_values(tmp_path):
    media = torch.cat([noise(3), to_image_batch(list_images(COLORS)[:3])])
    emb = embed_media(ColorHistogramEmbedder(), media)
    vendi = colour_scorer("exemplar-vendi-color", tmp_path)
    out = vendi(ScoreBatch(prompts=["x"] * 6, media=media))
    assert out.extras["set_value"].item() == pytest.approx(vendi_score(emb).item(), rel=1e-5)
    assert out.extras["reference_value"].item() == pytest.approx(vendi_score(vendi.exemplars.embeddings).item())
    mmd = colour_scorer("exemplar-mmd-witness-color", tmp_path, bandwidth=0.5)
    out = mmd(ScoreBatch(prompts=["x"] * 6, media=media))
    ref = mmd.exemplars.embeddings
    assert out.extras["set_value"].item() == pytest.approx(mmd2_unbiased(emb, ref, 0.5).item(), rel=1e-4)
    torch.testing.assert_close(out.raw, mmd_witness(emb, ref, 0.5), atol=1e-5, rtol=0)
    assert out.raw[3:].min() > out.raw[:3].max()  # exemplar-like samples sit where the reference has mass


def test_video_batches_are_embedded_as_the_mean_of_their_frames(tmp_path):
    scorer = colour_scorer("exemplar-centroid-color", tmp_path)
    video = torch.rand(2, 3, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    expected = torch.stack([scorer.embed(v).mean(0) for v in video])
    torch.testing.assert_close(scorer.embed(video), expected, atol=1e-6, rtol=0)


def test_pickled_scorer_reloads_exemplars_from_the_cache(tmp_path):
    scorer = colour_scorer("exemplar-centroid-color", tmp_path)
    batch = ScoreBatch(prompts=["x"] * 2, media=noise(2))
    before = scorer(batch).raw
    hits = CACHE_STATS["hit"]
    clone = pickle.loads(pickle.dumps(scorer))
    torch.testing.assert_close(clone(batch).raw, before, atol=0, rtol=0)
    assert CACHE_STATS["hit"] == hits + 1 and clone.exemplars.from_cache


def test_bad_cards_and_params_fail_with_clear_messages(tmp_path):
    with pytest.raises(ValueError, match="needs exemplars"):
        get_scorer("visalign.scorers.distributional:DistributionalScorer")
    with pytest.raises(ValueError, match="mode 'nearest'.*must be one of"):
        colour_scorer("exemplar-centroid-color", tmp_path, mode="nearest")
    with pytest.raises(ValueError, match="set kind: set-level"):
        colour_scorer("exemplar-centroid-color", tmp_path, mode="fd-change")
    missing = colour_scorer("exemplar-centroid-color", tmp_path, exemplars="no/such/folder")
    with pytest.raises(FileNotFoundError, match="no/such/folder.*tried"):
        missing(ScoreBatch(prompts=["x"], media=noise(1)))
    with pytest.raises(KeyError, match="color-histogram"):
        resolve_embedder("no-such-encoder")
    with pytest.raises(TypeError, match="embed_images nor embed_texts"):
        resolve_embedder("exemplar-centroid-color")


def test_exemplars_can_be_given_as_a_tensor_override(tmp_path):
    exemplars = to_image_batch(list_images(COLORS))
    from_tensor = colour_scorer("exemplar-knn-color", tmp_path, exemplars=exemplars)
    from_folder = colour_scorer("exemplar-knn-color", tmp_path)
    batch = ScoreBatch(prompts=["x"] * 3, media=noise(3))
    torch.testing.assert_close(from_tensor(batch).raw, from_folder(batch).raw, atol=1e-6, rtol=0)
