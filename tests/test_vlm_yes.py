"""VlmYesScorer on tiny random VLMs of every family (Qwen2-VL, Qwen2.5-VL, LLaVA, Idefics3/SmolVLM).

Each tiny model is written offline by tests/tiny/vlm.py and loaded back through AutoProcessor /
AutoModelForImageTextToText, so these tests run the real loading, chat-template and forward paths.
"""

from __future__ import annotations

import pytest
import torch

from visalign.scorers import ScoreBatch, WeightsUnavailableError, get_scorer
from visalign.scorers.vlm_answer import answer_token_ids
from visalign.scorers.vlm_yes import sample_frames

FAMILY_CARDS = {"qwen2-vl": "vqascore-qwen2-vl-2b", "qwen2.5-vl": "vqascore-qwen2.5-vl-3b",
                "llava": "vqascore-llava-1.5-7b", "idefics3": "vqascore-smolvlm"}
# The surface forms a human would list for each tokenizer style: byte-level BPE marks a leading space with Ġ,
# SentencePiece-style (LLaVA's Llama) with ▁.
VARIANTS = {"yes": ["Yes", "ĠYes", "yes", "Ġyes", "▁Yes", "▁yes"], "no": ["No", "ĠNo", "no", "Ġno", "▁No", "▁no"]}
PROMPTS = ["a red circle", "two blue squares above a green triangle", "x"]


@pytest.fixture(scope="module")
def family_dir(tiny_dir):
    from tests.tiny.vlm import build_family

    return lambda family: build_family(family, tiny_dir)


@pytest.fixture(scope="module")
def scorer_for(family_dir):
    cache = {}

    def make(card: str, family: str, **params):
        key = (card, family, repr(sorted(params.items())))
        if key not in cache:
            cache[key] = get_scorer(card, weights=str(family_dir(family)), params=params or None)
            cache[key].ensure_loaded()
        return cache[key]

    return make


def images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def hand_p_yes(scorer, image: torch.Tensor, question: str) -> tuple[float, float]:
    """P(yes) and the renormalised value for ONE unpadded query, computed from the model's logits by hand."""
    processor, model = scorer.processor, scorer.model
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[image]], return_tensors="pt", do_rescale=False)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].double()
    probs = torch.softmax(logits, dim=-1)
    vocab = processor.tokenizer.get_vocab()
    yes = sorted({vocab[t] for t in VARIANTS["yes"] if t in vocab})
    no = sorted({vocab[t] for t in VARIANTS["no"] if t in vocab})
    assert len(yes) >= 3 and len(no) >= 3, "the tiny vocabulary should hold several case/space variants"
    assert scorer.yes_ids == yes and scorer.no_ids == no
    p_yes, p_no = probs[yes].sum().item(), probs[no].sum().item()
    return p_yes, p_yes / (p_yes + p_no)


@pytest.mark.parametrize("family", sorted(FAMILY_CARDS))
def test_p_yes_equals_hand_computation_from_logits(family, scorer_for):
    scorer = scorer_for(FAMILY_CARDS[family], family)
    media = images(2, seed=1)
    out = scorer(ScoreBatch(prompts=PROMPTS[:2], media=media))
    for i in range(2):
        question = f'Does this figure show "{PROMPTS[i]}"? Please answer Yes or No.'
        p_yes, p_renorm = hand_p_yes(scorer, media[i], question)
        assert out.extras["p_yes"][i].item() == pytest.approx(p_yes, abs=1e-5)
        assert out.extras["p_yes_renorm"][i].item() == pytest.approx(p_renorm, abs=1e-5)
    torch.testing.assert_close(out.raw, out.extras["p_yes"])  # the cards' raw is p_yes
    assert out.extras["p_yes"][0] != pytest.approx(out.extras["p_yes"][1].item(), abs=1e-6), "images must matter"


@pytest.mark.parametrize("family", ["qwen2-vl", "llava", "idefics3"])
def test_padding_side_and_batch_composition_do_not_change_scores(family, scorer_for):
    scorer = scorer_for(FAMILY_CARDS[family], family)
    batch = ScoreBatch(prompts=PROMPTS, media=images(3, seed=2))  # prompts of different lengths → padding
    left = scorer(batch).raw
    alone = torch.cat([scorer(batch.select([i])).raw for i in range(3)])
    reordered = scorer(batch.select([2, 0, 1])).raw[[1, 2, 0]]
    tokenizer = scorer.processor.tokenizer
    tokenizer.padding_side = "right"
    try:
        right = scorer(batch).raw
        texts = [scorer.render(q, 1) for q in ("a", "a much longer question with many more words in it")]
        assert not tokenizer(texts, padding=True, return_tensors="pt")["attention_mask"][:, -1].all()
    finally:
        tokenizer.padding_side = "left"
    for other in (alone, reordered, right):
        torch.testing.assert_close(other, left, atol=1e-5, rtol=0)


def test_answer_token_ids_collects_case_and_space_variants(scorer_for):
    tokenizer = scorer_for("vqascore-qwen2-vl-2b", "qwen2-vl").processor.tokenizer
    ids = answer_token_ids(tokenizer, ["Yes", "yes"])
    assert tokenizer.convert_ids_to_tokens(ids) == sorted(["Yes", "ĠYes", "yes", "Ġyes"],
                                                          key=tokenizer.convert_tokens_to_ids)
    assert answer_token_ids(tokenizer, ["Supercalifragilistic"]) == []  # multi-token words are not answers


def test_pairwise_swap_average_is_antisymmetric(scorer_for):
    scorer = scorer_for("pairwise-qwen2-vl-2b", "qwen2-vl")
    a, b = images(3, seed=3), images(3, seed=4)
    ab = scorer(ScoreBatch(prompts=PROMPTS, media=a, references=b))
    ba = scorer(ScoreBatch(prompts=PROMPTS, media=b, references=a))
    torch.testing.assert_close(ab.raw + ba.raw, torch.ones(3), atol=1e-5, rtol=0)
    # The two asked orders are the same queries seen from the other side.
    torch.testing.assert_close(ab.extras["p_yes_forward"], ba.extras["p_yes_swapped"], atol=1e-5, rtol=0)
    expected = 0.5 * (ab.extras["p_yes_forward"] + 1 - ab.extras["p_yes_swapped"])
    torch.testing.assert_close(ab.extras["p_yes"], expected, atol=1e-6, rtol=0)
    assert (ab.raw - 0.5).abs().max() > 1e-3, "a constant 0.5 would pass the symmetry check trivially"
    # Without the swap, position bias remains: the property is what averaging buys.
    one_way = scorer_for("pairwise-qwen2-vl-2b", "qwen2-vl", swap_average=False)
    s_ab = one_way(ScoreBatch(prompts=PROMPTS, media=a, references=b)).raw
    s_ba = one_way(ScoreBatch(prompts=PROMPTS, media=b, references=a)).raw
    assert (s_ab + s_ba - 1).abs().max() > 1e-4


@pytest.mark.parametrize("card,family", [("vqascore-qwen2-vl-2b", "qwen2-vl"), ("vqascore-llava-1.5-7b", "llava"),
                                         ("video-vqascore-qwen2-vl-2b", "qwen2-vl")])
def test_differentiable_mode_reaches_pixels_and_matches_processor(card, family, scorer_for):
    scorer = scorer_for(card, family)
    shape = (2, 5, 3, 32, 32) if scorer.modality == "video" else (2, 3, 32, 32)
    media = torch.rand(*shape, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    batch = ScoreBatch(prompts=PROMPTS[:2], media=media)
    out = scorer(batch, grad=True)
    out.reward.sum().backward()
    assert media.grad is not None and media.grad.abs().sum() > 0
    if scorer.modality == "video":  # only sampled frames get gradient
        frames = sample_frames(torch.arange(5.0).view(5, 1, 1, 1), scorer.num_frames).flatten().long().tolist()
        touched = [t for t in range(5) if media.grad[:, t].abs().sum() > 0]
        assert touched == sorted(set(frames))
    # Tensor preprocessing reproduces the processor, so grad=True and grad=False agree.
    torch.testing.assert_close(out.raw.detach(), scorer(batch).raw, atol=1e-4, rtol=0)
    flat = media.detach().reshape(-1, 3, 32, 32)[:3]
    ours = scorer.family.tensor_pixels(scorer.processor.image_processor, flat)["pixel_values"]
    theirs = scorer.processor.image_processor(list(flat), do_rescale=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_idefics3_is_not_differentiable(scorer_for):
    scorer = scorer_for("vqascore-smolvlm", "idefics3")
    media = images(1, seed=6).requires_grad_(True)
    with pytest.raises(ValueError, match="not differentiable"):
        scorer(ScoreBatch(prompts=PROMPTS[:1], media=media), grad=True)


def test_multi_question_mean_and_per_question(scorer_for):
    scorer = scorer_for("multiq-qwen2-vl-2b", "qwen2-vl")
    media = images(2, seed=7)
    questions = [["Is there a shape?", "Is it red?", "Is it a circle?"], ["Is there a shape?"]]
    out = scorer(ScoreBatch(prompts=PROMPTS[:2], media=media, metadata=[{"questions": q} for q in questions]))
    per_q = out.extras["per_question"]
    assert per_q.shape == (2, 3) and torch.isnan(per_q[1, 1:]).all() and not torch.isnan(per_q[0]).any()
    for i, qs in enumerate(questions):
        single, _ = scorer.answer_probs([[media[i]]] * len(qs), [f"{q} Please answer Yes or No." for q in qs])
        torch.testing.assert_close(per_q[i, : len(qs)], single, atol=1e-5, rtol=0)
        assert out.raw[i].item() == pytest.approx(single.mean().item(), abs=1e-6)
    assert per_q[0].std() > 1e-4, "different questions must give different answers"


def test_card_questions_used_when_metadata_has_none(scorer_for):
    scorer = scorer_for("multiq-qwen2-vl-2b", "qwen2-vl", questions=["Is {prompt} visible?", "Is it pretty?"])
    out = scorer(ScoreBatch(prompts=PROMPTS[:1], media=images(1, seed=8), metadata=[{}]))
    assert out.extras["per_question"].shape == (1, 2)


def test_video_scores_the_sampled_frames_as_images(scorer_for):
    scorer = scorer_for("video-vqascore-qwen2-vl-2b", "qwen2-vl", num_frames=3)
    video = torch.rand(1, 7, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    out = scorer(ScoreBatch(prompts=PROMPTS[:1], media=video))
    frames = [video[0, t] for t in (0, 3, 6)]  # uniform over 7 frames, ends included
    expected, _ = scorer.answer_probs([frames], ['Does this video show "a red circle"? Please answer Yes or No.'])
    torch.testing.assert_close(out.raw, expected, atol=1e-6, rtol=0)
    assert "<|image_pad|>" in scorer.render("q", 3) and scorer.render("q", 3).count("<|vision_start|>") == 3


def test_context_system_and_examples(scorer_for):
    examples = [{"prompt": "a cat", "answer": "No"}]
    llava = scorer_for("vqascore-llava-1.5-7b", "llava", system="Judge strictly.", examples=examples)
    text = llava.render("Q?", 1)
    # LLaVA's template has no system turn: the instruction must still reach the model, inside the first user turn.
    assert text.startswith("USER: Judge strictly.\nDoes this figure show \"a cat\"?") and "ASSISTANT: No" in text
    qwen = scorer_for("vqascore-qwen2-vl-2b", "qwen2-vl", system="Judge strictly.", examples=examples)
    text = qwen.render("Q?", 1)
    assert text.startswith("<|im_start|>system\nJudge strictly.<|im_end|>") and "<|im_start|>assistant\nNo" in text
    plain = scorer_for("vqascore-qwen2-vl-2b", "qwen2-vl")
    batch = ScoreBatch(prompts=PROMPTS[:1], media=images(1, seed=10))
    assert qwen(batch).raw.item() != pytest.approx(plain(batch).raw.item(), abs=1e-6)


def test_missing_weights_raise_one_clear_error(tmp_path):
    message = r"vqascore-qwen2-vl-2b.*Qwen/Qwen2-VL-2B-Instruct.*local folder"
    with pytest.raises(WeightsUnavailableError, match=message):
        get_scorer("vqascore-qwen2-vl-2b")(ScoreBatch(prompts=["a"], media=torch.rand(1, 3, 32, 32)))
    with pytest.raises(WeightsUnavailableError, match="no config.json"):
        get_scorer("vqascore-qwen2-vl-2b", weights=str(tmp_path))(ScoreBatch(prompts=["a"],
                                                                             media=torch.rand(1, 3, 32, 32)))


def test_bad_card_params_raise():
    with pytest.raises(ValueError, match="params.mode"):
        get_scorer("vqascore-qwen2-vl-2b", params={"mode": "listwise"})
    with pytest.raises(ValueError, match="params.score"):
        get_scorer("vqascore-qwen2-vl-2b", params={"score": "logit"})


@pytest.mark.parametrize("card,family,side", [("vqascore-qwen2-vl-2b", "qwen2-vl", "left"),
                                              ("vqascore-qwen2.5-vl-3b", "qwen2.5-vl", "right"),
                                              ("vqascore-llava-1.5-7b", "llava", "right"),
                                              ("pairwise-qwen2-vl-2b", "qwen2-vl", "right")])
def test_tensor_inputs_equal_the_processor_and_upstream_positions(card, family, side, scorer_for):
    scorer = scorer_for(card, family)
    per_query = 2 if scorer.mode == "pairwise" else 1
    # Non-square (24 × 32 px → a 3 × 4 merged grid, max(h, w) = w) so that mixing up h and w would show.
    visuals = [list(torch.rand(per_query, 3, 24, 32, generator=torch.Generator().manual_seed(20 + i)))
               for i in range(3)]
    texts = [scorer.render(q, per_query) for q in ("a", "a much longer question with many more words", "b c")]
    tokenizer = scorer.processor.tokenizer
    tokenizer.padding_side = side
    try:
        fast = scorer.tensor_inputs(texts, [im for ims in visuals for im in ims])
        reference = scorer.processor_inputs(texts, visuals)
    finally:
        tokenizer.padding_side = "left"
    assert set(fast) == set(reference) - {"mm_token_type_ids"}
    for key in fast:
        assert fast[key].dtype == reference[key].dtype or fast[key].is_floating_point(), key
        torch.testing.assert_close(fast[key], reference[key], atol=1e-6, rtol=0, check_dtype=False)
    assert not fast["attention_mask"].all(), "the three texts must need padding for this test to mean anything"
    # Qwen's question sits between added tokens, so its ids are spliced into cached template ids; LLaVA's is not.
    assert (scorer._splice_cache[("image", per_query)] is not None) == (family != "llava")
    if scorer.family.mrope:
        from visalign.scorers.vlm_inputs import mrope_position_ids

        config = scorer.model.config
        ours = mrope_position_ids(fast["input_ids"], fast["attention_mask"],
                                  (config.image_token_id, config.video_token_id), fast["image_grid_thw"],
                                  config.vision_config.spatial_merge_size)
        upstream, _ = scorer.model.model.get_rope_index(reference["input_ids"], reference["mm_token_type_ids"],
                                                        image_grid_thw=reference["image_grid_thw"],
                                                        attention_mask=reference["attention_mask"])
        torch.testing.assert_close(ours, upstream, atol=0, rtol=0)


def test_batched_scoring_skips_the_processor_and_per_row_rope(scorer_for, monkeypatch):
    scorer = scorer_for("vqascore-qwen2-vl-2b", "qwen2-vl")
    batch = ScoreBatch(prompts=PROMPTS, media=images(3, seed=11))
    expected = scorer(batch).raw  # first call of this shape: checked against the processor once
    calls = []
    processor_call = type(scorer.processor).__call__
    monkeypatch.setattr(type(scorer.processor), "__call__",
                        lambda *a, **k: calls.append("processor") or processor_call(*a, **k))
    rope = scorer.model.model.get_rope_index
    monkeypatch.setattr(scorer.model.model, "get_rope_index", lambda *a, **k: calls.append("rope") or rope(*a, **k))
    again = scorer(ScoreBatch(prompts=PROMPTS[::-1], media=images(3, seed=11).flip(0))).raw
    assert calls == [], f"the steady-state batched path ran {calls}"
    torch.testing.assert_close(again.flip(0), expected, atol=1e-6, rtol=0)


def test_fast_inputs_off_gives_the_same_scores(scorer_for):
    batch = ScoreBatch(prompts=PROMPTS, media=images(3, seed=12))
    fast = scorer_for("vqascore-qwen2-vl-2b", "qwen2-vl")(batch).raw
    slow_scorer = scorer_for("vqascore-qwen2-vl-2b", "qwen2-vl", fast_inputs=False)
    torch.testing.assert_close(slow_scorer(batch).raw, fast, atol=1e-5, rtol=0)
    assert slow_scorer._fast_checked == {}


def hand_p_yes_video(scorer, clip: torch.Tensor, question: str) -> float:
    """P(yes) for ONE native-video query, from the processor and a plain model forward (upstream rope, no cache)."""
    processor, model = scorer.processor, scorer.model
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], videos=[clip], return_tensors="pt", do_rescale=False, cap_pixels_per_frame=False)
    assert "pixel_values_videos" in inputs and "pixel_values" not in inputs
    with torch.no_grad():
        probs = torch.softmax(model(**inputs).logits[0, -1].double(), dim=-1)
    return probs[scorer.yes_ids].sum().item()


def test_native_video_input_is_the_hand_computation(scorer_for):
    # 3 frames: an odd count, so the processor pads the clip to the temporal patch (2) by repeating the last frame.
    scorer = scorer_for("video-vqascore-qwen2-vl-2b", "qwen2-vl", video_input="native", num_frames=3)
    video = torch.rand(2, 7, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    out = scorer(ScoreBatch(prompts=PROMPTS[:2], media=video))
    for i in range(2):
        clip = video[i, [0, 3, 6]]
        expected = hand_p_yes_video(scorer, clip, f'Does this video show "{PROMPTS[i]}"? Please answer Yes or No.')
        assert out.extras["p_yes"][i].item() == pytest.approx(expected, abs=1e-5)
    frames = scorer_for("video-vqascore-qwen2-vl-2b", "qwen2-vl", num_frames=3)(ScoreBatch(prompts=PROMPTS[:2],
                                                                                         media=video))
    assert (frames.raw - out.raw).abs().max() > 1e-4, "native video must not silently fall back to frames"
    text = scorer.render("q", 1, "video")
    assert text.count("<|video_pad|>") == 1 and "<|image_pad|>" not in text


def test_native_video_gradients_reach_the_sampled_frames(scorer_for):
    scorer = scorer_for("video-vqascore-qwen2-vl-2b", "qwen2-vl", video_input="native", num_frames=3)
    video = torch.rand(2, 7, 3, 32, 32, generator=torch.Generator().manual_seed(14)).requires_grad_(True)
    batch = ScoreBatch(prompts=PROMPTS[:2], media=video)
    out = scorer(batch, grad=True)
    out.reward.sum().backward()
    touched = [t for t in range(7) if video.grad[:, t].abs().sum() > 0]
    assert touched == [0, 3, 6]
    torch.testing.assert_close(out.raw.detach(), scorer(batch).raw, atol=1e-5, rtol=0)


def test_native_video_needs_a_video_family(scorer_for):
    with pytest.raises(ValueError, match="video_input 'native'"):
        scorer_for("vqascore-llava-1.5-7b", "llava", video_input="native")
    with pytest.raises(ValueError, match="params.video_input"):
        get_scorer("video-vqascore-qwen2-vl-2b", params={"video_input": "stream"})
