"""Pick-a-Pic v2 parquet shards: ties dropped and counted, label_0 orientation, lazy decoding,
one-line errors, and the path through read_pairs and the training loader."""

from __future__ import annotations

import io
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sipo_plugin.data import (
    BucketSpec,
    Draw,
    PairDataError,
    PairDataset,
    ParquetImage,
    make_pair_loader,
    read_pairs,
    read_pickapic,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encoded(color, size=(16, 16), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def write_shard(path, rows, row_group_size=2):
    """rows: (jpg_0 bytes, jpg_1 bytes, label_0, caption); plus a column the reader ignores."""
    table = pa.table({
        "caption": [r[3] for r in rows],
        "jpg_0": pa.array([r[0] for r in rows], type=pa.binary()),
        "jpg_1": pa.array([r[1] for r in rows], type=pa.binary()),
        "label_0": pa.array([r[2] for r in rows], type=pa.float64()),
        "ranking_id": list(range(len(rows))),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def color_of(x: torch.Tensor) -> tuple:
    """The RGB colour (0..255) of a [3, H, W] image in [-1, 1] at its centre."""
    c = x[:, x.shape[1] // 2, x.shape[2] // 2]
    return tuple(int(round(v)) for v in ((c + 1) * 127.5).tolist())


@pytest.fixture
def shards(tmp_path):
    """Two shards, 7 rows: 2 ties; row groups of 2 rows so lookups cross row groups."""
    folder = tmp_path / "pickapic"
    write_shard(folder / "train-00000.parquet", [
        (encoded(GREEN), encoded(RED), 1.0, "a green square"),
        (encoded(RED), encoded(BLUE, fmt="JPEG"), 0.0, "a blue square"),
        (encoded(RED), encoded(RED), 0.5, "a tie"),
        (encoded(BLUE), encoded(GREEN), 1.0, None),
    ])
    write_shard(folder / "train-00001.parquet", [
        (encoded(RED), encoded(RED), 0.5, "another tie"),
        (encoded(RED), encoded(GREEN, size=(24, 12)), 0.0, "a wide green"),
        (encoded(BLUE), encoded(RED), 1.0, "blue wins"),
    ])
    return folder


def test_folder_of_shards_drops_and_counts_ties(shards):
    lines = []
    records = read_pairs(shards, log=lines.append)
    assert lines == ["pickapic: 5 pairs from 2 shard(s); 2 ties dropped"]
    assert [r.prompt for r in records] == ["a green square", "a blue square", "", "a wide green",
                                           "blue wins"]
    first, second = shards / "train-00000.parquet", shards / "train-00001.parquet"
    assert records[0].chosen == ParquetImage(first, 0, "jpg_0")
    assert records[0].rejected == ParquetImage(first, 0, "jpg_1")
    # label_0 = 0: the second image is preferred
    assert records[1].chosen == ParquetImage(first, 1, "jpg_1")
    assert records[1].rejected == ParquetImage(first, 1, "jpg_0")
    assert records[3].chosen == ParquetImage(second, 1, "jpg_1")
    assert all(r.weight == 1.0 for r in records)
    # a single shard
    lines.clear()
    assert len(read_pairs(second, log=lines.append)) == 2
    assert lines == ["pickapic: 2 pairs from 1 shard(s); 1 ties dropped"]


def test_pixels_follow_the_label(shards):
    """Decoded lazily from the shard bytes: label_0 = 0 swaps winner and loser."""
    records = read_pairs(shards, log=None)
    dataset = PairDataset(records, 8)
    expected = [(GREEN, RED), (BLUE, RED), (BLUE, GREEN), (GREEN, RED), (BLUE, RED)]
    for i in [4, 0, 3, 1, 2]:  # out of order: the row-group cache is re-read as needed
        item = dataset[Draw(i, 0)]
        assert item["chosen"].shape == (3, 8, 8)
        win, lose = expected[i]
        assert color_of(item["rejected"]) == lose
        assert np.allclose(color_of(item["chosen"]), win, atol=3)  # JPEG: nearly exact
    assert dataset[Draw(3, 0)]["original_size"] == ((12, 24), (16, 16))  # (h, w) of winner, loser


def test_unlabelled_rows_counted(tmp_path):
    shard = write_shard(tmp_path / "s.parquet", [
        (encoded(GREEN), encoded(RED), 1.0, "x"), (encoded(GREEN), encoded(RED), None, "y")])
    lines = []
    assert len(read_pickapic(shard, log=lines.append)) == 1
    assert lines == ["pickapic: 1 pairs from 1 shard(s); 0 ties dropped; "
                     "1 rows without label_0 dropped"]


def test_corrupt_bytes_name_shard_and_row(tmp_path):
    shard = write_shard(tmp_path / "bad.parquet", [
        (encoded(GREEN), encoded(RED), 1.0, "fine"),
        (encoded(GREEN), b"\x89PNG\r\n\x1a\n not really", 1.0, "broken loser"),
        (encoded(GREEN), b"", 1.0, "empty loser"),
    ])
    records = read_pairs(shard, log=None)  # read time touches labels and captions only
    dataset = PairDataset(records, 8)
    dataset[Draw(0, 0)]
    for index, problem in ((1, "cannot decode image"), (2, "no image bytes")):
        with pytest.raises(PairDataError) as info:
            dataset[Draw(index, 0)]
        message = str(info.value)
        assert "\n" not in message
        assert f"{shard} row {index} (jpg_1)" in message and problem in message


@pytest.mark.parametrize("problem", ["label", "column", "file"])
def test_bad_shards_one_line(tmp_path, problem):
    shard = tmp_path / "s.parquet"
    if problem == "label":
        write_shard(shard, [(encoded(RED), encoded(RED), 1.0, "a"), (encoded(RED), encoded(RED),
                                                                     0.3, "b")])
        expected = [f"{shard} row 1", "'label_0' must be 1, 0 or 0.5", "0.3"]
    elif problem == "column":
        pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"], "label_0": [1.0]}), shard)
        expected = [str(shard), "missing column(s) 'jpg_1'"]
    else:
        shard.write_bytes(b"not parquet at all")
        expected = [str(shard), "not a readable parquet file"]
    with pytest.raises(PairDataError) as info:
        read_pairs(shard, log=None)
    assert "\n" not in str(info.value)
    for part in expected:
        assert part in str(info.value)


def test_missing_pyarrow_names_the_extra(shards, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(PairDataError) as info:
        read_pairs(shards, log=None)
    message = str(info.value)
    assert "\n" not in message and "pip install 'sipo-plugin[pickapic]'" in message


def test_folder_without_parquet_or_w_l_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PairDataError, match="w/ and l/.*parquet"):
        read_pairs(tmp_path)


def test_bucketed_loader_from_shards(shards):
    """Sizes come from the shard bytes; the wide pair gets a wide bucket."""
    records = read_pairs(shards, log=None)
    # buckets around 16^2 px, sides 8..32 in steps of 4, (w, h): ..., (16, 16), (20, 12), (24, 8)...
    spec = BucketSpec(16, min_bucket_reso=8, max_bucket_reso=32, bucket_reso_steps=4)
    loader = make_pair_loader(records, resolution=16, batch_size=1, seed=0, total=5, buckets=spec)
    sizes = {}
    for batch in loader:
        (index,) = batch.indices.tolist()
        sizes[index] = tuple(batch.extras["target_sizes"][0].tolist())
        assert batch.pixel_values.shape[-2:] == sizes[index]
    # pair 3: a 24x12 winner (aspect 2) and a 16x16 loser (aspect 1): sqrt(2) = 1.41 is closest to
    # 20 / 12 = 1.67 (1 is 0.41 away), so (h, w) = (12, 20); the square pairs stay 16 x 16
    assert sizes == {0: (16, 16), 1: (16, 16), 2: (16, 16), 3: (12, 20), 4: (16, 16)}


def test_bucket_sizes_are_read_once_and_a_broken_tie_is_harmless(tmp_path, monkeypatch):
    from sipo_plugin.data import pair_target_sizes
    from sipo_plugin.data.pickapic import ParquetImageReader

    shard = write_shard(tmp_path / "s.parquet", [
        (encoded(GREEN), encoded(RED), 1.0, "square"),
        (encoded(GREEN), b"broken", 0.5, "a tie with a broken image"),
        (encoded(RED), encoded(GREEN, size=(24, 12)), 0.0, "wide"),
    ])
    records = read_pairs(shard, log=None)
    spec = BucketSpec(16, min_bucket_reso=8, max_bucket_reso=32, bucket_reso_steps=4)
    assert pair_target_sizes(records, spec) == [(16, 16), (12, 20)]
    reads = []
    original = ParquetImageReader.read
    monkeypatch.setattr(ParquetImageReader, "read",
                        lambda self, image: reads.append(image) or original(self, image))
    assert pair_target_sizes(records, spec) == [(16, 16), (12, 20)]  # a second loader build
    assert reads == []  # the header pass is memoised per shard version
    broken = write_shard(tmp_path / "b.parquet", [
        (encoded(GREEN), encoded(RED), 1.0, "fine"), (b"broken", encoded(RED), 1.0, "broken")])
    with pytest.raises(PairDataError) as info:
        pair_target_sizes(read_pairs(broken, log=None), spec)
    assert "\n" not in str(info.value) and f"{broken} row 1 (jpg_0)" in str(info.value)


@pytest.mark.slow
def test_toy_training_on_bucketed_shards(tmp_path):
    """The training loop reads shards through read_pairs and trains on wide, square and tall
    buckets with flips and caption dropout; the LoRA moves and the loss stays finite."""
    from sipo_plugin.toy.domain import all_prompts, render_prompt
    from sipo_plugin.training.config import load_config
    from sipo_plugin.training.loop import train

    rng = np.random.default_rng(0)
    prompts = all_prompts()
    rows = []
    for i in range(12):
        prompt = prompts[int(rng.integers(len(prompts)))]
        size = [(32, 32), (48, 16), (16, 48)][i % 3]  # (w, h)
        images = [Image.fromarray(render_prompt(prompt, rng, saturation=s)).resize(size)
                  for s in (1.0, 0.4)]
        data = []
        for img in images:
            buffer = io.BytesIO()
            img.save(buffer, format="PNG")
            data.append(buffer.getvalue())
        rows.append((data[0], data[1], [1.0, 0.5, 1.0, 0.0][i % 4], prompt))
    write_shard(tmp_path / "shards" / "train-0.parquet", rows[:6], row_group_size=4)
    write_shard(tmp_path / "shards" / "train-1.parquet", rows[6:], row_group_size=4)
    config = load_config(None, [
        "--train_data", str(tmp_path / "shards"), "--resolution", "32", "--enable_bucket", "true",
        "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "16",
        "--flip_aug", "true", "--caption_dropout_rate", "0.3",
        "--output_dir", str(tmp_path / "run"),
        "--max_train_steps", "4", "--train_batch_size", "2", "--learning_rate", "1e-3",
        "--objective", "diffusion-dpo", "--logging_steps", "1"])
    result = train(config)
    assert result.steps == 4 and result.num_pairs == 9  # 12 rows, 3 ties
    lora = [p for m in result.adapter.trainable_modules() for n, p in m.named_parameters()
            if "lora_B" in n]
    assert lora and any(p.abs().max() > 0 for p in lora)
    assert np.isfinite(result.last_metrics["train/loss"])


def test_a_parquet_image_has_a_file_identity_naming_its_cell(shards):
    from sipo_plugin.data.cache import file_identity
    shard = shards / "train-00000.parquet"
    first, second = ParquetImage(shard, 0, "jpg_0"), ParquetImage(shard, 0, "jpg_1")
    identity = file_identity(first)
    assert identity[0] == f"{shard} row 0 (jpg_0)"
    assert identity[1:] == [shard.stat().st_size, shard.stat().st_mtime_ns]
    assert file_identity(second) != identity  # the other cell of the same row


@pytest.mark.slow
def test_cached_latents_and_cached_reference_train_on_shards(shards, tmp_path):
    """cache_latents and reference = "cached" fingerprint parquet cells (not files) and train."""
    from sipo_plugin.training.config import load_config
    from sipo_plugin.training.loop import train
    config = load_config(None, [
        "--train_data", str(shards), "--resolution", "32", "--cache_latents_to_disk", "true",
        "--reference", "cached", "--reference_cache_draws", "2",
        "--output_dir", str(tmp_path / "run"), "--max_train_steps", "2",
        "--train_batch_size", "2", "--learning_rate", "1e-3", "--objective", "diffusion-dpo",
        "--logging_steps", "1"])
    result = train(config)
    assert result.steps == 2 and result.num_pairs == 5
    assert len(list((tmp_path / "run" / "cache" / "latents").glob("*.safetensors"))) == 5
    assert (tmp_path / "run" / "cache" / "reference_errors.safetensors").is_file()
    assert np.isfinite(result.last_metrics["train/loss"])
