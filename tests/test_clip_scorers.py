"""CLIP-similarity and embedding-head scorers against hand computations on tiny offline models.

Reference values are computed straight from the models (open_clip ``encode_*``, transformers
``get_*_features``) so a wrong mode formula, preprocessing constant or reduction over frames/references fails.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.tiny.clip import build_embedding_head, build_hf_clip, build_open_clip, tiny_head_layers
from visalign.scorers import ScoreBatch, WeightsUnavailableError, get_scorer
from visalign.scorers.clip import ImagePreprocess, hf_preprocess, lambda_harmonic
from visalign.scorers.convert import convert_checkpoint
from visalign.scorers.embedding_head import EmbeddingMLP

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def open_clip_dir(tiny_dir):
    return build_open_clip(tiny_dir)


@pytest.fixture(scope="module")
def hf_dir(tiny_dir):
    return build_hf_clip(tiny_dir)


@pytest.fixture(scope="module")
def open_clip_model(open_clip_dir):
    """The tiny open_clip model and tokenizer loaded by open_clip itself, independent of the scorer."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
    return model.eval(), open_clip.get_tokenizer(f"local-dir:{open_clip_dir}"), preprocess


@pytest.fixture(scope="module")
def clipscore(open_clip_dir):
    return get_scorer("clip-vit-b32", weights=str(open_clip_dir))


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_clipscore_equals_hand_computation_open_clip(clipscore, open_clip_model):
    model, tokenizer, _ = open_clip_model
    x = images()
    out = clipscore(ScoreBatch(prompts=PROMPTS, media=x))
    # 32 px input = the tower's size, so preprocessing is only normalisation by the config's (ImageNet) mean/std.
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer([f"A photo depicts {p}" for p in PROMPTS])), dim=-1)
    cos = (img * txt).sum(-1)
    torch.testing.assert_close(out.raw, 2.5 * cos.clamp(min=0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.extras["cosine"], cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.reward, cos.clamp(0, 1), atol=1e-5, rtol=0)  # affine [0, 2.5] undoes w


def test_open_clip_token_cache_equals_the_tokenizer(clipscore, open_clip_model):
    _, tokenizer, _ = open_clip_model
    clipscore.ensure_loaded()
    backend = clipscore._backend
    first = ["a red circle", "two blue squares", "a red circle"]
    assert torch.equal(backend.tokens(first), tokenizer(first))
    # Cached and new prompts mixed, in a different order: each row must still be its own prompt's ids.
    second = ["a green triangle", "a red circle", "two blue squares above it"]
    assert torch.equal(backend.tokens(second), tokenizer(second))
    assert not torch.equal(backend.tokens(second)[0], backend.tokens(second)[1])
    # Repeated prompts are encoded once and fanned back out in order.
    texts = ["a red circle", "two blue squares", "a red circle", "x"]
    torch.testing.assert_close(clipscore.embed_texts(texts), torch.cat([clipscore.embed_texts([t]) for t in texts]),
                               atol=1e-6, rtol=0)


def test_clipscore_clamps_negative_cosine_to_zero(open_clip_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    # Same tiny model with the text projection negated: every image–text cosine flips sign and becomes < 0.
    shutil.copy(open_clip_dir / "open_clip_config.json", tmp_path / "open_clip_config.json")
    state = load_file(str(open_clip_dir / "open_clip_model.safetensors"))
    state["text_projection"] = -state["text_projection"]
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    anti = get_scorer("clip-vit-b32", weights=str(tmp_path))
    x = images().requires_grad_(True)
    out = anti(ScoreBatch(prompts=PROMPTS, media=x), grad=True)
    assert (out.extras["cosine"] < 0).all()
    assert torch.equal(out.raw, torch.zeros(2)) and torch.equal(out.reward, torch.zeros(2))


def test_logit_mode_equals_hand_computation_hf(hf_dir):
    from transformers import AutoTokenizer, CLIPModel

    scorer = get_scorer("pickscore", weights=str(hf_dir))
    x = images(seed=1)
    out = scorer(ScoreBatch(prompts=PROMPTS, media=x))
    model = CLIPModel.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)(PROMPTS, padding=True, return_tensors="pt")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # CLIPImageProcessor defaults
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=(x - mean) / std)
        txt = model.get_text_features(**tok)
        img = F.normalize(getattr(img, "pooler_output", img), dim=-1)
        txt = F.normalize(getattr(txt, "pooler_output", txt), dim=-1)
        expected = model.logit_scale.exp() * (img * txt).sum(-1)
    torch.testing.assert_close(out.raw, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.reward, (expected / 26.0).clamp(0, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(scorer.embed_texts(PROMPTS), txt, atol=1e-5, rtol=0)


def test_hpsv2_cosine_mode_has_no_logit_scale(open_clip_dir):
    hps = get_scorer("hpsv2", weights=str(open_clip_dir))
    x = images(seed=2)
    expected = (hps.embed_images(x) * hps.embed_texts(PROMPTS)).sum(-1)
    torch.testing.assert_close(hps(ScoreBatch(prompts=PROMPTS, media=x)).raw, expected, atol=1e-5, rtol=0)


def test_embeddings_are_unit_float32_and_batch_invariant(clipscore):
    x = images(3, size=48)
    emb = clipscore.embed_images(x)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(clipscore.embed_images(x[1:2]), emb[1:2], atol=1e-5, rtol=0)
    txt = clipscore.embed_texts(["a", "a much longer prompt about shapes"])
    assert txt.shape == (2, 16) and not torch.allclose(txt[0], txt[1])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        clipscore.embed_images(x[0])


def test_video_scores_are_mean_of_frame_scores(clipscore):
    video = torch.rand(2, 3, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    out = clipscore(ScoreBatch(prompts=PROMPTS, media=video))
    frames = torch.stack([clipscore(ScoreBatch(prompts=PROMPTS, media=video[:, t])).raw for t in range(3)], 1)
    torch.testing.assert_close(out.raw, frames.mean(1), atol=1e-5, rtol=0)


def test_clip_i_with_k_references_is_mean_over_references(open_clip_dir):
    scorer = get_scorer("clip-i-vit-b32", weights=str(open_clip_dir))
    x, refs = images(seed=4), torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    together = scorer(ScoreBatch(prompts=PROMPTS, media=x, references=refs)).raw
    single = [scorer(ScoreBatch(prompts=PROMPTS, media=x, references=refs[:, k])).raw for k in range(3)]
    torch.testing.assert_close(together, torch.stack(single, 1).mean(1), atol=1e-5, rtol=0)
    expected = (scorer.embed_images(x) * scorer.embed_images(refs[:, 0])).sum(-1)
    torch.testing.assert_close(single[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_lambda_harmonic_matches_formula(open_clip_dir, lam):
    scorer = get_scorer("lambda-harmonic-vit-b32", weights=str(open_clip_dir), params={"lam": lam})
    x, refs = images(seed=6), torch.rand(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    out = scorer(ScoreBatch(prompts=PROMPTS, media=x, references=refs))
    img = scorer.embed_images(x)
    s_i = (torch.einsum("bd,bkd->bk", img, scorer.embed_images(refs.flatten(0, 1)).view(2, 2, -1)).mean(1) + 1) / 2
    s_t = ((img * scorer.embed_texts(PROMPTS)).sum(-1) + 1) / 2
    torch.testing.assert_close(out.extras["s_image"], s_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.extras["s_text"], s_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.raw, 1 / (lam / (s_i + 1e-8) + (1 - lam) / (s_t + 1e-8)), atol=1e-5, rtol=0)
    if lam == 0.0:
        torch.testing.assert_close(out.raw, s_t, atol=1e-6, rtol=0)
    if lam == 1.0:
        torch.testing.assert_close(out.raw, s_i, atol=1e-6, rtol=0)


def test_lambda_harmonic_punishes_neglecting_either_term():
    # Harmonic, not arithmetic: (1, 0.1) at λ = 0.5 gives 2·0.1/1.1 ≈ 0.18, far below the mean 0.55.
    value = lambda_harmonic(torch.tensor([1.0]), torch.tensor([0.1]), 0.5)
    torch.testing.assert_close(value, torch.tensor([2 * 0.1 / 1.1]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="lam"):
        lambda_harmonic(torch.tensor([1.0]), torch.tensor([1.0]), 1.5)


def test_gradient_reaches_pixels_through_resize_and_crop(clipscore):
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(8), requires_grad=True)
    clipscore(ScoreBatch(prompts=PROMPTS, media=x), grad=True).reward.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # 48×64 resizes to 32×42 and the centre crop keeps resized columns 5..36, i.e. input columns ~7..55 plus the
    # antialiasing filter's reach (~3 px): the outermost input columns must get no gradient, the middle ones must.
    per_column = x.grad.abs().sum(dim=(0, 1, 2))
    assert (per_column[:3] == 0).all() and (per_column[-3:] == 0).all()
    assert (per_column[10:54] > 0).all()


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


# Tolerances, in normalised units (pixel / std, std ≈ 0.27, so 0.03 ≈ 2/255 of a pixel value). Measured on this
# machine (transformers 5.23, torch 2.14): smooth images mean 0.0044, max 0.016 — the uint8 rounding of PIL's
# output. Per-pixel noise: mean 0.005, 99.9th percentile 0.13, max 0.30 — PIL's separable filter rounds and clamps
# to uint8 between its horizontal and vertical passes, torch stays in float, so bicubic overshoot differs at
# isolated high-contrast pixels.
@pytest.mark.parametrize("size_hw", [(300, 400), (257, 513), (120, 90)])
def test_tensor_preprocessing_matches_hf_pil_processor(size_hw):
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL implementation
        from transformers import CLIPImageProcessor as Processor
    processor = Processor()  # CLIP's real config: shortest edge 224 bicubic, crop 224, OpenAI mean/std
    spec = hf_preprocess(processor, "test")
    h, w = size_hw
    g = torch.Generator().manual_seed(h)
    smooth = F.interpolate(torch.rand(1, 3, h // 16 + 2, w // 16 + 2, generator=g), size=(h, w), mode="bilinear")
    noise = torch.rand(1, 3, h, w, generator=g)
    for x, q999_tol, max_tol in ((smooth, 0.03, 0.03), (noise, 0.2, 0.5)):
        x = (x * 255).round() / 255  # exactly representable in the uint8 image PIL sees
        ref = processor(images=_pil(x[0]), return_tensors="pt")["pixel_values"]
        ours = spec(x)
        assert ours.shape == ref.shape == (1, 3, 224, 224)
        diff = (ours - ref).abs()
        assert diff.mean() < 0.01, diff.mean()
        assert diff.flatten().quantile(0.999) < q999_tol and diff.max() < max_tol, diff.max()


def test_tensor_preprocessing_matches_open_clip_transform(clipscore, open_clip_model):
    _, _, preprocess = open_clip_model  # open_clip's own PIL pipeline with the config's mean/std
    x = F.interpolate(torch.rand(1, 3, 7, 9, generator=torch.Generator().manual_seed(9)), size=(45, 61),
                      mode="bilinear")
    x = (x * 255).round() / 255
    clipscore.ensure_loaded()
    ours = clipscore._backend.preprocess(x)
    ref = preprocess(_pil(x[0])).unsqueeze(0)
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    assert (ours - ref).abs().max() < 0.03


def test_preprocess_squash_and_passthrough():
    spec = ImagePreprocess(crop_px=(4, 4), resize_px=None, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(spec(x), (x - 0.5) / 0.5)  # right size: no resampling at all
    assert spec(torch.rand(2, 3, 9, 5)).shape == (2, 3, 4, 4)


def test_missing_hub_weights_offline_give_one_clear_error():
    with pytest.raises(WeightsUnavailableError) as hf_err:
        get_scorer("clip-vit-l14")(ScoreBatch(prompts=["x"], media=images(1)))
    message = str(hf_err.value)
    assert "'clip-vit-l14'" in message and "openai/clip-vit-large-patch14" in message
    assert "weights='/path'" in message and "--weights clip-vit-l14=/path" in message
    with pytest.raises(WeightsUnavailableError, match=r"'clip-vit-b32'.*timm/vit_base_patch32_clip_224\.openai"):
        get_scorer("clip-vit-b32")(ScoreBatch(prompts=["x"], media=images(1)))


def test_missing_converted_file_says_how_to_convert(tmp_path):
    scorer = get_scorer("hpsv2", weights={"file": str(tmp_path / "hps.safetensors")})
    with pytest.raises(WeightsUnavailableError, match=r"'hpsv2'.*visalign convert-weights .*hps\.safetensors"):
        scorer(ScoreBatch(prompts=["x"], media=images(1)))
    with pytest.raises(WeightsUnavailableError, match="open_clip_config.json"):
        get_scorer("clip-vit-b32", weights=str(tmp_path))(ScoreBatch(prompts=["x"], media=images(1)))


def test_bad_card_params_fail_at_construction(open_clip_dir):
    with pytest.raises(ValueError, match="params.mode"):
        get_scorer("clip-vit-b32", params={"mode": "clip-score"})
    with pytest.raises(ValueError, match="needs"):
        get_scorer("clip-vit-b32", params={"mode": "clip-i"})  # card lacks 'reference' in needs
    with pytest.raises(ValueError, match="lam"):
        get_scorer("lambda-harmonic-vit-b32", params={"lam": 2.0})


def test_loading_and_scoring_never_unpickle(monkeypatch, open_clip_dir, hf_dir, tiny_dir):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on the scorer loading path")

    monkeypatch.setattr(torch, "load", refuse)
    head = build_embedding_head(tiny_dir, tiny_head_layers(), [0.2, 0.2, 0.1, 0.0, 0.0])
    scorers = [get_scorer("clip-vit-b32", weights=str(open_clip_dir)), get_scorer("pickscore", weights=str(hf_dir)),
               get_scorer("laion-aesthetic-v2", weights={"local_dir": str(hf_dir), "head_file": str(head)},
                          params={"head_layers": tiny_head_layers()})]
    for scorer in scorers:
        assert torch.isfinite(scorer(ScoreBatch(prompts=PROMPTS, media=images())).raw).all()


def _laion_layout_head(layers: list[int]) -> EmbeddingMLP:
    torch.manual_seed(1)
    return EmbeddingMLP(layers, [0.2, 0.2, 0.1, 0.0, 0.0]).eval()


def test_convert_round_trip_then_aesthetic_head_scores_match(tmp_path, hf_dir):
    layers = tiny_head_layers()
    head = _laion_layout_head(layers)
    assert [k for k in head.state_dict() if k.endswith("weight")] == [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]
    # Published checkpoints wrap the state dict and may carry DataParallel's "module." prefix.
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in head.state_dict().items()}},
               tmp_path / "head.pth")
    report = convert_checkpoint(tmp_path / "head.pth", tmp_path / "out" / "head.safetensors")
    assert report.num_tensors == 10 and len(report.source_sha256) == 64
    with pytest.raises(FileExistsError):
        convert_checkpoint(tmp_path / "head.pth", tmp_path / "out" / "head.safetensors")

    scorer = get_scorer("laion-aesthetic-v2", weights={"local_dir": str(hf_dir), "head_file": str(report.destination)},
                        params={"head_layers": layers})
    x = images(seed=10)
    out = scorer(ScoreBatch(prompts=["", ""], media=x))
    with torch.no_grad():
        expected = head(scorer.embed_images(x))
    torch.testing.assert_close(out.raw, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.reward, ((expected - 1) / 9).clamp(0, 1), atol=1e-5, rtol=0)
    clone = pickle.loads(pickle.dumps(scorer))
    assert "_head" not in clone.__dict__ and clone._backend is None  # no weights travel in the pickle


class _NotATensor:
    pass


def test_convert_refuses_arbitrary_pickled_objects(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        convert_checkpoint(tmp_path / "evil.pt", tmp_path / "evil.safetensors")
    assert not (tmp_path / "evil.safetensors").exists()


def test_convert_weights_cli(tmp_path, capsys):
    from safetensors.torch import load_file

    from visalign.cli import main

    torch.save({"a": torch.arange(3.0), "b": torch.ones(2, 2)}, tmp_path / "plain.pt")
    assert main(["convert-weights", str(tmp_path / "plain.pt"), str(tmp_path / "plain.safetensors")]) == 0
    assert "2 tensors" in capsys.readouterr().out
    loaded = load_file(str(tmp_path / "plain.safetensors"))
    torch.testing.assert_close(loaded["a"], torch.arange(3.0))
    with pytest.raises(SystemExit, match="does not exist"):
        main(["convert-weights", str(tmp_path / "missing.pt"), str(tmp_path / "x.safetensors")])


def test_head_layout_mismatch_is_a_clear_error(tmp_path, hf_dir, tiny_dir):
    head = build_embedding_head(tiny_dir, tiny_head_layers(), [0.2, 0.2, 0.1, 0.0, 0.0])
    scorer = get_scorer("laion-aesthetic-v2", weights={"local_dir": str(hf_dir), "head_file": str(head)},
                        params={"head_layers": [16, 64, 16, 8, 4, 1]})
    with pytest.raises(ValueError, match="does not match card 'laion-aesthetic-v2'"):
        scorer(ScoreBatch(prompts=[""], media=images(1)))
    wrong_dim = get_scorer("laion-aesthetic-v2", weights={"local_dir": str(hf_dir), "head_file": str(head)})
    with pytest.raises(ValueError, match="does not match"):  # the card's 768-wide head vs the tiny file
        wrong_dim(ScoreBatch(prompts=[""], media=images(1)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["clip-vit-b32", "pickscore", "lambda-harmonic-vit-b32"])
def test_cuda_scores_match_cpu(name, open_clip_dir, hf_dir):
    folder = hf_dir if name == "pickscore" else open_clip_dir
    batch = ScoreBatch(prompts=PROMPTS, media=images(seed=11), references=images(seed=12))
    cpu = get_scorer(name, weights=str(folder))(batch).raw
    cuda = get_scorer(name, weights=str(folder), device="cuda")(batch).raw
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-3, rtol=1e-3)
