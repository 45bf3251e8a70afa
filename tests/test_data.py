"""Pair readers (folder, JSONL, CSV), their one-line errors, image loading, batch layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from sipo_plugin.data import (
    Draw,
    PairDataError,
    PairDataset,
    PairRecord,
    collate_pairs,
    load_image,
    pair_loader,
    read_pairs,
    split_pair,
)
from sipo_plugin.data.sampler import fixed_batches

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255,) * 3, (0,) * 3


def save_image(path: Path, color=RED, size=(16, 16), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).convert(mode).save(path)
    return path


def make_folder(root: Path, names=("b", "a"), caption_extension=".txt") -> Path:
    """w/NAME.png (winner, caption beside it) and l/NAME.jpg, written in unsorted order."""
    for name in names:
        save_image(root / "w" / f"{name}.png", GREEN)
        save_image(root / "l" / f"{name}.jpg", RED)
        (root / "w" / f"{name}{caption_extension}").write_text(f"prompt {name}\nsecond line\n")
    return root


def raises_one_line(match_parts, fn, *args, **kwargs) -> str:
    with pytest.raises(PairDataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for part in match_parts:
        assert str(part) in message, f"{part!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------------------------------
# Readers


def test_folder_pairs_sorted_with_captions(tmp_path):
    root = make_folder(tmp_path / "ds", names=("b", "a", "c"))
    (root / "w" / "notes.md").write_text("ignored")
    records = read_pairs(root)
    assert [r.prompt for r in records] == ["prompt a", "prompt b", "prompt c"]
    assert records[0] == PairRecord("prompt a", root / "w" / "a.png", root / "l" / "a.jpg", 1.0)
    assert all(r.chosen.is_absolute() and r.rejected.is_absolute() for r in records)


def test_folder_caption_extension(tmp_path):
    root = make_folder(tmp_path, names=("x",), caption_extension=".caption")
    assert read_pairs(root, caption_extension=".caption")[0].prompt == "prompt x"
    raises_one_line([root / "w" / "x.txt", "caption"], read_pairs, root)


def test_jsonl_manifest(tmp_path):
    save_image(tmp_path / "img" / "w1.png")
    save_image(tmp_path / "img" / "l1.webp")
    save_image(tmp_path / "img" / "w2.bmp")
    save_image(tmp_path / "img" / "l2.jpeg")
    rows = [
        {"prompt": "z first", "chosen": "img/w1.png", "rejected": "img/l1.webp", "extra": 1},
        {"prompt": "a second", "chosen": "img/w2.bmp", "rejected": "img/l2.jpeg", "weight": 2.5},
    ]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    records = read_pairs(manifest)
    assert [r.prompt for r in records] == ["z first", "a second"]  # manifest order is kept
    assert [r.weight for r in records] == [1.0, 2.5]
    assert records[0].chosen == tmp_path / "img" / "w1.png"
    assert records[1].rejected == tmp_path / "img" / "l2.jpeg"


def test_csv_manifest(tmp_path):
    save_image(tmp_path / "w.png")
    save_image(tmp_path / "l.png")
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(
        "prompt,chosen,rejected,weight,source\n"
        '"a cat, red",w.png,l.png,0.5,x\n'
        "a dog,w.png,l.png,,y\n"
    )
    records = read_pairs(manifest)
    assert [(r.prompt, r.weight) for r in records] == [("a cat, red", 0.5), ("a dog", 1.0)]
    assert records[0].chosen == tmp_path / "w.png" and records[0].rejected == tmp_path / "l.png"


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the file (and line)


def test_source_missing_and_unknown_type(tmp_path):
    raises_one_line([tmp_path / "nope", "not found"], read_pairs, tmp_path / "nope")
    other = tmp_path / "pairs.parquetx"
    other.write_text("")
    raises_one_line([other, "unknown pair source type"], read_pairs, other)
    (tmp_path / "folder").mkdir()
    raises_one_line([tmp_path / "folder", "w/ and l/"], read_pairs, tmp_path / "folder")


def test_malformed_json_line(tmp_path):
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"\n')
    raises_one_line([manifest, "line 1", "malformed JSON"], read_pairs, manifest)
    manifest.write_text('["not", "an", "object"]\n')
    raises_one_line([manifest, "line 1", "JSON object"], read_pairs, manifest)


def test_missing_required_field(tmp_path):
    save_image(tmp_path / "w.png")
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a", "chosen": "w.png"}) + "\n")
    raises_one_line([jsonl, "line 1", "'rejected'"], read_pairs, jsonl)
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("prompt,chosen\na,w.png\n")
    raises_one_line([csv_file, "line 1", "'rejected'", "column"], read_pairs, csv_file)


def test_missing_image_names_manifest_line_and_path(tmp_path):
    save_image(tmp_path / "w.png")
    save_image(tmp_path / "l.png")
    good = {"prompt": "a", "chosen": "w.png", "rejected": "l.png"}
    bad = {"prompt": "b", "chosen": "gone.png", "rejected": "l.png"}
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in (good, good, bad)) + "\n")
    message = raises_one_line(
        [manifest, "line 3", "'chosen' image not found", tmp_path / "gone.png", "relative"],
        read_pairs, manifest,
    )
    assert message.startswith(str(manifest))
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("prompt,chosen,rejected\na,w.png,l.png\nb,w.png,lost.png\n")
    raises_one_line([csv_file, "line 3", "'rejected'", tmp_path / "lost.png"], read_pairs, csv_file)


def test_unpaired_files(tmp_path):
    root = make_folder(tmp_path / "a", names=("p",))
    save_image(root / "w" / "q.png")
    raises_one_line([root / "w" / "q.png", "unpaired winner", "l/q"], read_pairs, root)
    root = make_folder(tmp_path / "b", names=("p",))
    save_image(root / "l" / "r.png")
    raises_one_line([root / "l" / "r.png", "unpaired loser", "w/r"], read_pairs, root)


def test_missing_caption(tmp_path):
    root = make_folder(tmp_path, names=("p", "q"))
    (root / "w" / "q.txt").unlink()
    raises_one_line([root / "w" / "q.txt", "caption file missing"], read_pairs, root)


def test_empty_datasets(tmp_path):
    (tmp_path / "f" / "w").mkdir(parents=True)
    (tmp_path / "f" / "l").mkdir()
    raises_one_line([tmp_path / "f", "empty dataset"], read_pairs, tmp_path / "f")
    jsonl = tmp_path / "e.jsonl"
    jsonl.write_text("\n\n")
    raises_one_line([jsonl, "empty dataset"], read_pairs, jsonl)
    csv_file = tmp_path / "e.csv"
    csv_file.write_text("prompt,chosen,rejected\n")
    raises_one_line([csv_file, "empty dataset"], read_pairs, csv_file)


@pytest.mark.parametrize("weight", [0, -1.0, "nan", float("inf"), "abc", True])
def test_bad_weights(tmp_path, weight):
    save_image(tmp_path / "w.png")
    save_image(tmp_path / "l.png")
    row = {"prompt": "a", "chosen": "w.png", "rejected": "l.png", "weight": weight}
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps(row) + "\n")
    raises_one_line([manifest, "line 1", "'weight'"], read_pairs, manifest)


def test_bad_weight_csv_nan(tmp_path):
    save_image(tmp_path / "w.png")
    save_image(tmp_path / "l.png")
    manifest = tmp_path / "p.csv"
    manifest.write_text("prompt,chosen,rejected,weight\na,w.png,l.png,NaN\n")
    raises_one_line([manifest, "line 2", "'weight'"], read_pairs, manifest)


def test_corrupt_image_named_at_load_time(tmp_path):
    root = make_folder(tmp_path, names=("a",))
    corrupt = root / "l" / "a.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    records = read_pairs(root)  # read time only checks that the files exist
    raises_one_line([corrupt, "cannot decode"], load_image, corrupt, 8)
    raises_one_line([corrupt], PairDataset(records, 8).__getitem__, Draw(0, 0))
    truncated = root / "w" / "a.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    raises_one_line([truncated], load_image, truncated, 8)


def test_image_deleted_after_reading(tmp_path):
    root = make_folder(tmp_path, names=("a",))
    records = read_pairs(root)
    records[0].chosen.unlink()
    raises_one_line([records[0].chosen, "not found"], PairDataset(records, 8).__getitem__, Draw(0, 0))


# ---------------------------------------------------------------------------------------------
# Images and batches


def test_load_image_range_resize_and_center_crop(tmp_path):
    img = Image.new("RGB", (40, 20), WHITE)  # wide: left quarter black, right quarter blue
    img.paste(BLACK, (0, 0, 10, 20))
    img.paste(BLUE, (30, 0, 40, 20))
    img.save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 10)  # shorter side 20 -> 10, 20x10 -> center 10x10
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    # the black and blue quarters (resized to 5 px each) are cropped away: all white inside
    assert torch.allclose(x[:, :, 1:-1], torch.ones(3, 10, 8), atol=0.02)
    tall = save_image(tmp_path / "tall.png", BLACK, size=(6, 12))
    y = load_image(tall, 16)  # up-scaling path
    assert y.shape == (3, 16, 16) and torch.allclose(y, -torch.ones_like(y), atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_load_image_converts_to_rgb(tmp_path, mode):
    path = save_image(tmp_path / f"m_{mode}.png", RED, mode=mode)
    x = load_image(path, 8)
    assert x.shape == (3, 8, 8)
    if mode != "L":
        assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]), atol=1e-6)


def test_collate_winners_first(tmp_path):
    colors = {"a": (GREEN, RED), "b": (BLUE, BLACK), "c": (WHITE, RED)}
    for name, (win, lose) in colors.items():
        save_image(tmp_path / "w" / f"{name}.png", win)
        save_image(tmp_path / "l" / f"{name}.png", lose)
        (tmp_path / "w" / f"{name}.txt").write_text(name)
    manifest_rows = read_pairs(tmp_path)
    records = [PairRecord(r.prompt, r.chosen, r.rejected, w)
               for r, w in zip(manifest_rows, (1.0, 2.0, 0.5))]
    dataset = PairDataset(records, 8)
    batch = collate_pairs([dataset[Draw(i, 0)] for i in range(3)])
    assert batch.pixel_values.shape == (6, 3, 8, 8)
    assert batch.prompts == ["a", "b", "c"]
    assert batch.weights.dtype == torch.float32
    assert batch.weights.tolist() == [1.0, 2.0, 0.5]
    x_w, x_l = split_pair(batch.pixel_values)
    for i, name in enumerate("abc"):
        win, lose = (torch.tensor(c, dtype=torch.float32) / 127.5 - 1 for c in colors[name])
        assert torch.allclose(x_w[i, :, 0, 0], win) and torch.allclose(x_l[i, :, 0, 0], lose)
        assert torch.equal(batch.pixel_values[i], x_w[i])
        assert torch.equal(batch.pixel_values[3 + i], x_l[i])
    loader = pair_loader(dataset, fixed_batches(range(3), 2))
    first = next(iter(loader))
    assert first.pixel_values.shape == (4, 3, 8, 8) and len(first.prompts) == 2
    assert math.isclose(first.weights[1].item(), 2.0)
