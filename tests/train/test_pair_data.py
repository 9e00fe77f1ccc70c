"""pair_data.py: offline preference pairs from tables, datasets folders and hub ids; bad rows listed, identical
pairs refused."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visalign.train.sources.pair_data import PairData, PairDataError, PairRecord, _to_tensor, read_pairs


def _pixels(seed: int, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    """Random uint8 RGB pixels ``[H, W, 3]``, distinct per seed."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _png(path: Path, seed: int, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(seed, size)).save(path)
    return path


def _png_bytes(seed: int, size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_pixels(seed, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def _expected(seed: int, size: tuple[int, int] = (8, 8)) -> torch.Tensor:
    return torch.from_numpy(_pixels(seed, size)).permute(2, 0, 1).float() / 255.0


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _good_rows(folder: Path, count: int) -> list[dict]:
    """``count`` rows of distinct 8×8 PNGs under ``folder/img``, named by paths relative to ``folder``."""
    rows = []
    for i in range(count):
        _png(folder / "img" / f"c{i}.png", 2 * i)
        _png(folder / "img" / f"r{i}.png", 2 * i + 1)
        rows.append({"prompt": f"prompt {i}", "chosen": f"img/c{i}.png", "rejected": f"img/r{i}.png", "seed": i})
    return rows


def _assert_pair(record: PairRecord, chosen_seed: int, rejected_seed: int) -> None:
    assert record.chosen.dtype == torch.float32 and record.chosen.shape == (3, 8, 8)
    assert record.rejected.shape == record.chosen.shape
    torch.testing.assert_close(record.chosen, _expected(chosen_seed), atol=0, rtol=0)
    torch.testing.assert_close(record.rejected, _expected(rejected_seed), atol=0, rtol=0)


# ---------------------------------------------------------------- tables


def test_jsonl_round_trip_resolves_paths_against_the_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    rows = _good_rows(folder, 2)
    rows[1]["rejected"] = str(_png(tmp_path / "elsewhere" / "abs.png", 99))  # an absolute path
    table = _jsonl(folder / "pairs.jsonl", rows)
    monkeypatch.chdir(tmp_path)  # relative paths must not resolve against the working directory

    data = read_pairs(table)

    assert isinstance(data, PairData) and data.skipped == [] and data.source == str(table)
    assert [r.prompt for r in data.records] == ["prompt 0", "prompt 1"]
    _assert_pair(data.records[0], 0, 1)
    _assert_pair(data.records[1], 2, 99)
    assert data.records[0].metadata == {"seed": 0, "row": 0}
    assert data.records[1].metadata == {"seed": 1, "row": 1}
    assert data.summary() == f"2 pairs read from {table}, 0 skipped"


def test_csv_round_trip_keeps_other_columns_as_metadata(tmp_path):
    folder = tmp_path / "data"
    rows = [{**r, "judge": "human"} for r in _good_rows(folder, 3)]
    table = _csv(folder / "pairs.csv", rows)

    data = read_pairs(table)

    assert len(data.records) == 3 and data.skipped == []
    for i, record in enumerate(data.records):
        _assert_pair(record, 2 * i, 2 * i + 1)
        assert record.prompt == f"prompt {i}"
        assert record.metadata == {"seed": str(i), "judge": "human", "row": i}


def test_missing_empty_and_corrupt_images_are_skipped_with_reasons(tmp_path):
    folder = tmp_path / "data"
    rows = _good_rows(folder, 6)
    (folder / "img" / "empty.png").write_bytes(b"")
    (folder / "img" / "garbage.png").write_bytes(b"\x89PNG not really an image" * 4)
    (folder / "img" / "truncated.png").write_bytes(_png_bytes(7, (32, 32))[:60])
    rows[1]["chosen"] = "img/missing.png"
    rows[2]["rejected"] = "img/empty.png"
    rows[3]["chosen"] = "img/garbage.png"
    rows[5]["rejected"] = "img/truncated.png"
    table = _jsonl(folder / "pairs.jsonl", rows)

    data = read_pairs(table)

    assert [r.metadata["row"] for r in data.records] == [0, 4]
    _assert_pair(data.records[1], 8, 9)
    skipped = {s.row: s for s in data.skipped}
    assert sorted(skipped) == [1, 2, 3, 5]
    assert (skipped[1].column, skipped[1].path) == ("chosen", str(folder / "img" / "missing.png"))
    assert "no such file" in skipped[1].reason
    assert (skipped[2].column, skipped[2].path) == ("rejected", str(folder / "img" / "empty.png"))
    assert "empty" in skipped[2].reason
    assert skipped[3].column == "chosen" and "not a readable image" in skipped[3].reason
    assert skipped[5].column == "rejected" and "cannot decode image" in skipped[5].reason
    summary = data.summary()
    assert summary.startswith(f"2 pairs read from {table}, 4 skipped")
    assert "row 1 (chosen" in summary and "missing.png" in summary and "no such file" in summary
    assert "row 2 (rejected" in summary and "and 1 more" in summary and "row 5" not in summary
    assert "\n" not in summary


def test_empty_prompt_rows_are_skipped(tmp_path):
    rows = _good_rows(tmp_path, 3)
    rows[0]["prompt"] = "   "
    rows[2]["prompt"] = None
    data = read_pairs(_jsonl(tmp_path / "pairs.jsonl", rows))
    assert [r.metadata["row"] for r in data.records] == [1]
    assert [(s.row, s.column, s.reason) for s in data.skipped] == [(0, "prompt", "empty prompt"),
                                                                  (2, "prompt", "empty prompt")]


def test_a_source_where_every_row_is_skipped_raises_with_the_summary(tmp_path):
    rows = _good_rows(tmp_path, 2)
    rows[0]["chosen"] = "img/nope.png"
    rows[1]["prompt"] = ""
    with pytest.raises(PairDataError, match="No usable pair") as err:
        read_pairs(_jsonl(tmp_path / "pairs.jsonl", rows))
    assert "0 pairs read" in str(err.value) and "2 skipped" in str(err.value)
    assert "nope.png" in str(err.value) and "empty prompt" in str(err.value)


# ---------------------------------------------------------------- refusals


def test_the_same_file_as_chosen_and_rejected_is_refused(tmp_path):
    rows = _good_rows(tmp_path, 4)
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[3]["rejected"] = str((tmp_path / rows[3]["chosen"]).resolve())  # same file, spelled differently
    with pytest.raises(PairDataError, match="carries no preference") as err:
        read_pairs(_jsonl(tmp_path / "pairs.jsonl", rows))
    message = str(err.value)
    assert "row 1 (same file" in message and "row 3 (same file" in message
    assert "row 0" not in message and "row 2" not in message
    assert "remove" in message


def test_pixel_identical_images_are_refused(tmp_path):
    rows = _good_rows(tmp_path, 3)
    _png(tmp_path / "img" / "copy.png", 4)  # the same pixels as img/c2.png, in another file
    rows[2]["rejected"] = "img/copy.png"
    with pytest.raises(PairDataError, match="row 2 \\(pixel-identical") as err:
        read_pairs(_csv(tmp_path / "pairs.csv", rows))
    assert "row 0" not in str(err.value) and "row 1" not in str(err.value)


def test_the_refusal_names_at_most_five_rows(tmp_path):
    rows = _good_rows(tmp_path, 7)
    for row in rows:
        row["rejected"] = row["chosen"]
    with pytest.raises(PairDataError) as err:
        read_pairs(_jsonl(tmp_path / "pairs.jsonl", rows))
    message = str(err.value)
    assert "7 pair(s)" in message and "row 4 (" in message and "row 5 (" not in message and "and 2 more" in message


def test_a_missing_column_names_it_the_columns_present_and_the_keyword(tmp_path):
    good = _good_rows(tmp_path, 1)
    rows = [{"prompt": r["prompt"], "image_a": r["chosen"], "rejected": r["rejected"]} for r in good]
    table = _jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(PairDataError) as err:
        read_pairs(table)
    message = str(err.value)
    assert "no column 'chosen'" in message and "chosen_column=" in message
    assert "['prompt', 'image_a', 'rejected']" in message and "rejected_column=" not in message
    assert read_pairs(table, chosen_column="image_a").records[0].prompt == "prompt 0"


def test_a_missing_table_file_is_a_clear_error(tmp_path):
    with pytest.raises(PairDataError, match="no such file"):
        read_pairs(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- sizes


def test_resolution_resizes_every_pair_to_one_square_size(tmp_path):
    _png(tmp_path / "small.png", 1, (8, 8))
    _png(tmp_path / "wide.png", 2, (12, 16))
    Image.new("RGB", (6, 10), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (10, 6), (0, 0, 255)).save(tmp_path / "blue.png")
    rows = [{"prompt": "a", "chosen": "small.png", "rejected": "wide.png"},
            {"prompt": "b", "chosen": "red.png", "rejected": "blue.png"}]
    table = _jsonl(tmp_path / "pairs.jsonl", rows)

    data = read_pairs(table, resolution=4)

    assert all(r.chosen.shape == r.rejected.shape == (3, 4, 4) for r in data.records)
    torch.testing.assert_close(data.records[1].chosen, torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 4, 4))
    torch.testing.assert_close(data.records[1].rejected, torch.tensor([0, 0, 1.0])[:, None, None].expand(3, 4, 4))
    with pytest.raises(PairDataError, match="resolution="):
        read_pairs(table)  # rows of 8×8 and 10×6 chosen images need one size


def test_without_resolution_the_rejected_image_takes_the_chosen_ones_size(tmp_path):
    _png(tmp_path / "c.png", 1, (8, 8))
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "r.png")
    data = read_pairs(_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "c.png", "rejected": "r.png"}]))
    record = data.records[0]
    torch.testing.assert_close(record.chosen, _expected(1), atol=0, rtol=0)
    assert record.rejected.shape == (3, 8, 8)
    torch.testing.assert_close(record.rejected, torch.tensor([0, 1.0, 0])[:, None, None].expand(3, 8, 8))


def test_limit_reads_only_the_first_rows(tmp_path):
    rows = _good_rows(tmp_path, 3)
    rows[2]["chosen"] = "img/missing.png"
    data = read_pairs(_jsonl(tmp_path / "pairs.jsonl", rows), limit=2)
    assert [r.metadata["row"] for r in data.records] == [0, 1] and data.skipped == []


# ---------------------------------------------------------------- two images and a label


def test_label_column_is_the_probability_that_image_0_is_preferred(tmp_path):
    rows = []
    for i, label in enumerate([1.0, 0.0, 0.5, 0.8, 2.0, 0]):
        _png(tmp_path / f"a{i}.png", 10 * i)
        _png(tmp_path / f"b{i}.png", 10 * i + 1)
        rows.append({"caption": f"p{i}", "image_0": f"a{i}.png", "image_1": f"b{i}.png", "label_0": label})
    data = read_pairs(_jsonl(tmp_path / "pairs.jsonl", rows), prompt_column="caption", chosen_column="image_0",
                      rejected_column="image_1", label_column="label_0")

    assert [r.metadata["row"] for r in data.records] == [0, 1, 3, 5]
    by_row = {r.metadata["row"]: r for r in data.records}
    for row, image_0_preferred in [(0, True), (1, False), (3, True), (5, False)]:
        seed_0, seed_1 = 10 * row, 10 * row + 1
        _assert_pair(by_row[row], *((seed_0, seed_1) if image_0_preferred else (seed_1, seed_0)))
    assert by_row[3].metadata == {"label_0": 0.8, "row": 3}
    assert [(s.row, s.column, s.reason) for s in data.skipped][0] == (2, "label_0", "tie")
    assert data.skipped[1].row == 4 and "not a number in [0, 1]" in data.skipped[1].reason


def test_label_column_missing_is_named(tmp_path):
    with pytest.raises(PairDataError, match="no column 'label_0'.*label_column="):
        read_pairs(_jsonl(tmp_path / "pairs.jsonl", _good_rows(tmp_path, 1)), label_column="label_0")


# ---------------------------------------------------------------- datasets sources


@pytest.mark.parametrize("form", ["path", "bytes", "dict", "pil"])
def test_every_image_cell_form_decodes_to_the_same_pixels(tmp_path, form):
    path = _png(tmp_path / "x.png", 5)
    cell = {"path": "x.png", "bytes": path.read_bytes(), "dict": {"bytes": path.read_bytes(), "path": None},
            "pil": Image.fromarray(_pixels(5))}[form]
    torch.testing.assert_close(_to_tensor(cell, tmp_path), _expected(5), atol=0, rtol=0)


def test_a_datasets_folder_reads_back_equal_to_the_table(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the [data] extra (datasets) is not installed")
    rows = _good_rows(tmp_path, 3)
    from_table = read_pairs(_jsonl(tmp_path / "pairs.jsonl", rows))
    columns = {k: [r[k] if k in ("prompt", "seed") else str(tmp_path / r[k]) for r in rows] for k in rows[0]}
    ds = datasets.Dataset.from_dict(columns).cast_column("chosen", datasets.Image())
    ds = ds.cast_column("rejected", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved_dict"))

    for data in (read_pairs(tmp_path / "saved"), read_pairs(str(tmp_path / "saved_dict"), split="test")):
        assert len(data.records) == 3 and data.skipped == []
        for ours, theirs in zip(data.records, from_table.records, strict=True):
            assert ours.prompt == theirs.prompt and ours.metadata == theirs.metadata
            torch.testing.assert_close(ours.chosen, theirs.chosen, atol=0, rtol=0)
            torch.testing.assert_close(ours.rejected, theirs.rejected, atol=0, rtol=0)
    with pytest.raises(PairDataError, match="no split 'train'.*\\['test'\\].*split="):
        read_pairs(tmp_path / "saved_dict")


def test_a_pick_a_pic_style_folder_of_bytes_with_a_corrupt_image_and_a_tie(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the [data] extra (datasets) is not installed")
    ds = datasets.Dataset.from_dict({
        "caption": ["a", "b", "c", "d"],
        "jpg_0": [_png_bytes(0), _png_bytes(2), b"garbage bytes", _png_bytes(6)],
        "jpg_1": [_png_bytes(1), _png_bytes(3), _png_bytes(5), _png_bytes(7)],
        "label_0": [0.0, 0.5, 1.0, 1.0],
    })
    ds.save_to_disk(str(tmp_path / "pap"))
    data = read_pairs(tmp_path / "pap", prompt_column="caption", chosen_column="jpg_0", rejected_column="jpg_1",
                      label_column="label_0")
    assert [r.metadata["row"] for r in data.records] == [0, 3]
    _assert_pair(data.records[0], 1, 0)
    _assert_pair(data.records[1], 6, 7)
    assert [(s.row, s.column, s.path) for s in data.skipped] == [(1, "label_0", None), (2, "jpg_0", None)]
    assert data.skipped[0].reason == "tie" and "not a readable image" in data.skipped[1].reason


def test_a_corrupt_image_inside_an_image_feature_is_skipped_not_raised(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the [data] extra (datasets) is not installed")
    ds = datasets.Dataset.from_dict({
        "prompt": ["a", "b"],
        "chosen": [{"bytes": _png_bytes(0), "path": None}, {"bytes": b"not an image", "path": "bad.png"}],
        "rejected": [{"bytes": _png_bytes(1), "path": None}, {"bytes": _png_bytes(3), "path": None}],
    }).cast_column("chosen", datasets.Image()).cast_column("rejected", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    data = read_pairs(tmp_path / "saved")
    _assert_pair(data.records[0], 0, 1)
    assert len(data.records) == 1 and [(s.row, s.column) for s in data.skipped] == [(1, "chosen")]
    assert "bad.png" in data.skipped[0].reason


def test_a_hub_id_that_cannot_be_loaded_offline_is_one_clear_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the [data] extra (datasets) is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # datasets reads these variables at import, which may have happened before this test set them.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PairDataError) as err:
        read_pairs("visalign-tests/no-such-pairs")
    message = str(err.value)
    assert "'visalign-tests/no-such-pairs'" in message
    assert "Pass a local .jsonl/.csv file or a save_to_disk folder" in message


def test_without_datasets_a_folder_source_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "saved").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match='pip install "visalign\\[data\\]"'):
        read_pairs(tmp_path / "saved")


def test_a_folder_not_written_by_datasets_is_a_clear_error(tmp_path):
    pytest.importorskip("datasets", reason="the [data] extra (datasets) is not installed")
    (tmp_path / "plain").mkdir()
    with pytest.raises(PairDataError, match="not one written by datasets' save_to_disk"):
        read_pairs(tmp_path / "plain")
