"""Groundwork of the shapes asset build: the seeded data stream and the word-level CLIP tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from visalign.shapes import build, grammar, oracle, prompt_sets, world


def test_image_stream_is_seeded_graded_correct_and_advances():
    config = build.ShapesDataConfig(seed=7, batch_size=32)
    first, second = build.iter_image_batches(config), build.iter_image_batches(config)
    a, b = next(first), next(second)
    np.testing.assert_array_equal(a.media, b.media)
    assert a.captions == b.captions and a.media.shape == (32, 3, 32, 32) and a.media.dtype == np.float32
    assert not np.array_equal(next(first).media, a.media)  # the stream moves on
    other = next(build.iter_image_batches(build.ShapesDataConfig(seed=8, batch_size=32)))
    assert other.captions != a.captions
    assert [grammar.parse_prompt(c) for c in a.captions] == a.specs
    assert oracle.grade_images(a.media, a.captions).all.all()
    assert {world.split_of(s) for s in a.specs} == {"train"}


def test_image_stream_follows_mix_split_and_wording_options():
    only_relations = next(build.iter_image_batches(build.ShapesDataConfig(batch_size=40, mix={"relation": 1.0})))
    assert {s.kind for s in only_relations.specs} == {"relation"}
    held = next(build.iter_image_batches(build.ShapesDataConfig(batch_size=40, split="heldout", size_px=64)))
    assert {world.split_of(s) for s in held.specs} == {"heldout"} and held.media.shape[-1] == 64
    canonical = next(build.iter_image_batches(build.ShapesDataConfig(batch_size=40, paraphrase=False)))
    assert canonical.captions == [grammar.canonical_caption(s) for s in canonical.specs]
    mixed = next(build.iter_image_batches(build.ShapesDataConfig(batch_size=200)))
    kinds = [s.kind for s in mixed.specs]
    assert 0.4 < kinds.count("relation") / 200 < 0.7 and "single" in kinds and "count" in kinds


def test_video_stream_shapes_and_grades():
    config = build.ShapesDataConfig(seed=1, batch_size=6, num_frames=12)
    batch = next(build.iter_video_batches(config))
    assert batch.media.shape == (6, 12, 3, 32, 32)
    assert {s.kind for s in batch.specs} == {"motion"}
    assert oracle.grade_videos(batch.media, batch.captions).all.all()
    np.testing.assert_array_equal(next(build.iter_video_batches(config)).media, batch.media)


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"split": "test"}, {"mix": {"relations": 1.0}},
                                 {"mix": {"single": -1.0, "count": 1.0}}, {"num_frames": 1}])
def test_config_errors_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build.ShapesDataConfig(**bad)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build.write_clip_tokenizer(tmp_path_factory.mktemp("shapes-tokenizer"))


def test_tokenizer_has_one_token_per_caption_word(tokenizer_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    assert tok.model_max_length == 16
    for word in grammar.vocabulary():
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    captions = [c for lines in prompt_sets.build_prompt_sets().values() for c in lines]
    encoded = tok(captions)["input_ids"]
    for text, ids in zip(captions, encoded, strict=True):
        assert len(ids) == len(text.split()) + 2 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True).strip() == text
    assert tok.unk_token_id not in {i for ids in encoded for i in ids[1:-1]}
    summary = build.tokenizer_summary(tokenizer_dir)
    assert summary["bos_token_id"] == tok.bos_token_id and summary["pad_token_id"] == tok.pad_token_id
    assert summary["vocab_size"] == len(tok)


def test_tokenizer_build_is_deterministic(tokenizer_dir, tmp_path):
    again = build.write_clip_tokenizer(tmp_path / "again")
    for name in ("vocab.json", "merges.txt"):
        assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name
    with pytest.raises(ValueError, match="max_length"):
        build.write_clip_tokenizer(tmp_path / "short", max_length=8)
