"""Aspect-ratio buckets, the bucketed batch order, caption dropout, flips and SDXL's size
conditioning (original_sizes, crop_top_lefts, target_sizes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sipo_plugin.data import (
    BucketBatchSampler,
    BucketSpec,
    Draw,
    PairAugmentation,
    PairBatchSampler,
    PairDataError,
    PairDataset,
    PairRecord,
    bucket_resolutions,
    collate_pairs,
    fit_to_size,
    make_pair_loader,
    pair_bucket_hw,
    read_pairs,
    select_bucket,
)
from sipo_plugin.data.augment import draw_uniforms
from sipo_plugin.training.config import ConfigError, load_config

# resolution 64, sides 32..128 in steps of 16, area 4096: for w = 32, 48, ..., 128 the height is
# min(128, floor(4096 // w / 16) * 16) = 128, 80, 64, 48, 32, 32, 32 (kept when >= 32)
HAND_RESOS = [(32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32),
              (128, 32)]


def test_bucket_resolutions_hand_checked():
    assert bucket_resolutions(64, 32, 128, 16) == HAND_RESOS
    assert BucketSpec(64, 32, 128, 16).resolutions() == HAND_RESOS
    # sd-scripts' defaults at 512: the square, and 256 x 1024 at the extremes
    resos = BucketSpec(512).resolutions()
    assert (512, 512) in resos and (256, 1024) in resos and (1024, 256) in resos
    assert (448, 576) in resos and (576, 448) in resos  # 262144 // 448 = 585 -> 576
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in resos)


@pytest.mark.parametrize("size, bucket_wh", [
    ((100, 50), (80, 48)),  # aspect 2: 80/48 = 1.67 is 0.33 away, 96/32 = 3 is 1 away
    ((50, 100), (48, 80)),  # 0.5: 48/80 = 0.6
    ((64, 64), (64, 64)),
    ((1000, 10), (128, 32)),  # far beyond the widest: the widest
    ((30, 100), (32, 112)),  # 0.3: 32/112 = 0.286 is nearer than 32/96 = 0.333
])
def test_select_bucket_nearest_aspect(size, bucket_wh):
    w, h = size
    assert select_bucket(HAND_RESOS, w / h) == bucket_wh


def test_pair_bucket_from_both_images():
    # (w, h) sizes; the result is (h, w); the pair's aspect is sqrt(ar_w * ar_l)
    assert pair_bucket_hw(HAND_RESOS, (100, 50), (100, 50)) == (48, 80)
    assert pair_bucket_hw(HAND_RESOS, (100, 50), (50, 50)) == (48, 80)  # sqrt(2) = 1.41 -> 1.67
    assert pair_bucket_hw(HAND_RESOS, (50, 50), (100, 50)) == (48, 80)  # same either way round
    assert pair_bucket_hw(HAND_RESOS, (50, 100), (100, 50)) == (64, 64)  # sqrt(0.5 * 2) = 1
    # sqrt(3 * 2) = 2.45: 96/32 = 3 is 0.55 away, 80/48 = 1.67 is 0.78 away
    assert pair_bucket_hw(HAND_RESOS, (120, 40), (100, 50)) == (32, 96)


@pytest.mark.parametrize("kwargs, message", [
    (dict(resolution=64, bucket_reso_steps=0), "bucket_reso_steps"),
    (dict(resolution=512, min_bucket_reso=100), "multiples"),
    (dict(resolution=2048), "between"),
])
def test_bucket_spec_problems(kwargs, message):
    assert message in BucketSpec(**kwargs).problem()


# ---------------------------------------------------------------------------------------------
# Batch order


BUCKETS = ["a"] * 7 + ["b"] * 4 + ["c"] * 1 + ["a"] * 3  # 15 pairs, three buckets


def sampler_batches(sampler) -> list[list[int]]:
    """The pair indices of each batch (the samplers give `Draw`s)."""
    return [[draw.index for draw in batch] for batch in sampler]


def test_bucket_batches_hold_one_bucket_and_cover_each_epoch():
    sampler = BucketBatchSampler(BUCKETS, 3, seed=5, total=40)
    assert sampler.per_epoch == 10 // 3 + 4 // 3 + 0  # 3 + 1 (c has no full batch)
    batches = sampler_batches(sampler)
    assert len(batches) == len(sampler) == 40
    for batch in batches:
        assert len(batch) == 3 and len({BUCKETS[i] for i in batch}) == 1
    for epoch in range(10):
        seen = [i for batch in batches[epoch * 4:(epoch + 1) * 4] for i in batch]
        assert len(set(seen)) == 12 and 11 not in seen  # distinct pairs; "c" never fills a batch
    assert batches[:4] != batches[4:8]  # a new order each epoch


def test_bucket_order_is_a_function_of_seed_and_position():
    full = sampler_batches(BucketBatchSampler(BUCKETS, 2, seed=1, total=30))
    assert full == sampler_batches(BucketBatchSampler(BUCKETS, 2, seed=1, total=30))
    assert full != sampler_batches(BucketBatchSampler(BUCKETS, 2, seed=2, total=30))
    for start in (1, 6, 7, 19):  # mid-epoch and epoch boundaries (6 batches per epoch)
        tail = sampler_batches(BucketBatchSampler(BUCKETS, 2, seed=1, total=30, start=start))
        assert tail == full[start:]
    tagged = list(BucketBatchSampler(BUCKETS, 2, seed=1, total=30))
    assert [[d.index for d in batch] for batch in tagged] == full
    assert [batch[0].epoch for batch in tagged] == [p // 7 for p in range(30)]


def test_one_bucket_is_the_plain_order():
    plain = PairBatchSampler(10, 3, seed=3, total=12, start=2)
    bucketed = BucketBatchSampler(["x"] * 10, 3, seed=3, total=12, start=2)
    assert list(plain) == list(bucketed)
    assert all(isinstance(d, Draw) for b in plain for d in b)


def test_no_full_bucket_is_an_error():
    with pytest.raises(ValueError, match="no bucket holds a full batch of 3"):
        BucketBatchSampler(["a", "a", "b", "b"], 3, seed=0, total=1)


# ---------------------------------------------------------------------------------------------
# Caption dropout and flips


def test_caption_dropout_rate_and_determinism():
    aug = PairAugmentation(seed=11, caption_dropout_rate=0.3)
    drops = [aug.decide(epoch, index)[0] for epoch in range(4) for index in range(1500)]
    assert abs(sum(drops) / len(drops) - 0.3) < 0.02  # binomial sd 0.006
    assert drops == [aug.decide(epoch, index)[0] for epoch in range(4) for index in range(1500)]
    assert drops[:1500] != drops[1500:3000]  # another epoch, other decisions
    other_seed = PairAugmentation(seed=12, caption_dropout_rate=0.3)
    assert drops[:1500] != [other_seed.decide(0, index)[0] for index in range(1500)]
    assert not any(PairAugmentation(seed=11).decide(0, i)[0] for i in range(100))
    assert all(PairAugmentation(seed=11, caption_dropout_rate=1.0).decide(0, i)[0]
               for i in range(100))
    flips = [PairAugmentation(seed=11, flip_aug=True).decide(0, i)[1] for i in range(2000)]
    assert abs(sum(flips) / len(flips) - 0.5) < 0.04
    assert draw_uniforms(11, 0, 5) == draw_uniforms(11, 0, 5)
    with pytest.raises(ValueError, match="caption_dropout_rate"):
        PairAugmentation(caption_dropout_rate=1.5)


def striped(size, seed=0) -> Image.Image:
    """A (w, h) image whose every column has its own colour (flips and crops are visible)."""
    w, h = size
    g = torch.Generator().manual_seed(seed)
    columns = torch.randint(0, 256, (1, w, 3), generator=g, dtype=torch.uint8).expand(h, w, 3)
    return Image.fromarray(columns.contiguous().numpy())


def test_fit_to_size_crop_and_flip_hand_checked():
    img = striped((21, 8))  # (w, h): no resize into an 8 x 8 target; 13 spare columns
    plain = fit_to_size(img, (8, 8))
    assert plain.original_hw == (8, 21) and plain.target_hw == (8, 8)
    assert plain.crop_top_left == (0, 6)  # 13 // 2 columns cut on the left, 7 on the right
    assert np.array_equal(np.asarray(plain.image), np.asarray(img)[:, 6:14])
    flipped = fit_to_size(img, (8, 8), flip=True)
    assert flipped.crop_top_left == (0, 7)  # measured from the mirrored image's left: 21 - 8 - 6
    mirrored = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert np.array_equal(np.asarray(flipped.image), np.asarray(mirrored)[:, 7:15])
    # resize: 40 x 30 (w x h) into (h, w) = (12, 12): scale 0.4 -> 16 x 12, left (16 - 12) // 2
    resized = fit_to_size(striped((40, 30)), (12, 12), flip=True)
    assert resized.original_hw == (30, 40) and resized.crop_top_left == (0, 2)
    tall = fit_to_size(striped((10, 25)), (8, 10))  # scale 1: (h, w) 25 x 10 -> top (25 - 8) // 2
    assert tall.crop_top_left == (8, 0) and tall.image.size == (10, 8)


def write_pairs(folder, sizes) -> list[PairRecord]:
    """A JSONL manifest; pair i has a winner and a loser of the given (w, h) sizes."""
    rows = []
    for i, (size_w, size_l) in enumerate(sizes):
        striped(size_w, seed=2 * i).save(folder / f"{i}_w.png")
        striped(size_l, seed=2 * i + 1).save(folder / f"{i}_l.png")
        rows.append({"prompt": f"prompt {i}", "chosen": f"{i}_w.png", "rejected": f"{i}_l.png"})
    manifest = folder / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_pairs(manifest)


def test_flip_is_shared_by_the_pair_and_sizes_are_winners_first(tmp_path):
    records = write_pairs(tmp_path, [((21, 8), (10, 8))])
    plain = PairDataset(records, (8, 8))
    always = PairDataset(records, (8, 8), augmentation=PairAugmentation(flip_aug=True, seed=0))
    flip_draw = next(Draw(0, e) for e in range(50) if always.augmentation.decide(e, 0)[1])
    a, b = plain[Draw(0, 0)], always[flip_draw]
    assert torch.equal(b["chosen"], a["chosen"].flip(-1))
    assert torch.equal(b["rejected"], a["rejected"].flip(-1))
    assert a["crop_top_left"] == ((0, 6), (0, 1)) and b["crop_top_left"] == ((0, 7), (0, 1))
    batch = collate_pairs([a, b])
    assert batch.extras["original_sizes"].tolist() == [[8, 21], [8, 21], [8, 10], [8, 10]]
    assert batch.extras["crop_top_lefts"].tolist() == [[0, 6], [0, 7], [0, 1], [0, 1]]
    assert batch.extras["target_sizes"].tolist() == [[8, 8]] * 4
    assert batch.extras["original_sizes"].dtype == torch.int64


def test_bucketed_loader_sizes_and_resume(tmp_path):
    """Pairs of mixed shapes at resolution 32, buckets 16..64 in steps of 16, (w, h):
    (16, 48), (16, 64), (32, 32), (48, 16), (64, 16); 3 wide pairs (aspect 3 -> 48 x 16),
    3 square, 2 tall (20 x 60 and 24 x 64: sqrt(0.333 * 0.375) = 0.354 -> 16 x 48)."""
    wide, square, tall = ((96, 32), (90, 30)), ((40, 40), (40, 36)), ((20, 60), (24, 64))
    records = write_pairs(tmp_path, [wide, square, tall, wide, square, wide, square, tall])
    spec = BucketSpec(32, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=16)
    aug = PairAugmentation(seed=4, caption_dropout_rate=0.5, flip_aug=True)

    def batches(start):
        loader = make_pair_loader(records, resolution=32, batch_size=2, seed=4, total=9,
                                  start=start, buckets=spec, augmentation=aug)
        return list(loader)

    full = batches(0)
    assert len(full) == 9  # 1 + 1 + 1 batches an epoch (3 wide, 3 square, 2 tall: 3 full)
    expected_hw = {"wide": (16, 48), "square": (32, 32), "tall": (48, 16)}
    kind = ["wide", "square", "tall", "wide", "square", "wide", "square", "tall"]
    for batch in full:
        indices = batch.indices.tolist()
        hw = expected_hw[kind[indices[0]]]
        assert {kind[i] for i in indices} == {kind[indices[0]]}  # one bucket a batch
        assert batch.pixel_values.shape == (4, 3, *hw)
        assert batch.extras["target_sizes"].tolist() == [list(hw)] * 4
        sizes = {0: wide, 1: square, 2: tall}
        for slot, i in enumerate(indices):
            (ww, hw_w), (wl, hl) = sizes[[0, 1, 2, 0, 1, 0, 1, 2][i]]
            assert batch.extras["original_sizes"][slot].tolist() == [hw_w, ww]
            assert batch.extras["original_sizes"][2 + slot].tolist() == [hl, wl]
            assert batch.prompts[slot] in ("", f"prompt {i}")
    for position, batch in enumerate(full):  # 3 batches an epoch
        for i, prompt in zip(batch.indices.tolist(), batch.prompts):
            dropped = aug.decide(position // 3, i)[0]
            assert prompt == ("" if dropped else f"prompt {i}")
    prompts = [p for batch in full for p in batch.prompts]
    assert "" in prompts and any(p for p in prompts)  # rate 0.5 over 18 draws
    for start in (3, 5):
        tail = batches(start)
        assert len(tail) == 9 - start
        for got, want in zip(tail, full[start:]):
            assert got.prompts == want.prompts
            assert torch.equal(got.pixel_values, want.pixel_values)
            assert torch.equal(got.extras["crop_top_lefts"], want.extras["crop_top_lefts"])


def test_unbucketed_loader_keeps_the_plain_order(tmp_path):
    records = write_pairs(tmp_path, [((20, 20), (20, 20))] * 5)
    loader = make_pair_loader(records, resolution=8, batch_size=2, seed=9, total=4)
    order = [b.indices.tolist() for b in loader]
    assert order == sampler_batches(PairBatchSampler(5, 2, seed=9, total=4))


def test_bad_bucket_settings_are_one_line(tmp_path):
    records = write_pairs(tmp_path, [((20, 20), (20, 20))] * 2)
    with pytest.raises(PairDataError, match="bucket settings: .*between"):
        make_pair_loader(records, resolution=8, batch_size=1, seed=0, total=1,
                         buckets=BucketSpec(8))


def test_config_keys_and_validation(tmp_path):
    manifest = tmp_path / "p.jsonl"
    manifest.write_text("")
    base = ["--train_data", str(manifest)]
    config = load_config(None, base)
    d = config.data
    assert (d.enable_bucket, d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps,
            d.caption_dropout_rate, d.flip_aug) == (False, 256, 1024, 64, 0.0, False)
    config = load_config(None, [*base, "--enable_bucket", "true", "--flip_aug", "true",
                                "--caption_dropout_rate", "0.1"])
    assert config.data.enable_bucket and config.data.flip_aug
    with pytest.raises(ConfigError, match="caption_dropout_rate"):
        load_config(None, [*base, "--caption_dropout_rate", "1.5"])
    with pytest.raises(ConfigError, match="between min_bucket_reso"):
        load_config(None, [*base, "--enable_bucket", "true", "--resolution", "128"])
    load_config(None, [*base, "--resolution", "128"])  # buckets off: not checked


def test_exif_rotation_counts_in_sizes(tmp_path):
    """A JPEG stored 20 x 10 with EXIF orientation 6 (rotate 90) is a 10 x 20 image."""
    from sipo_plugin.data import ImageReader

    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (20, 10), (200, 0, 0)).save(path, exif=exif)
    assert Image.open(path).size == (20, 10)
    reader = ImageReader()
    assert reader.size(path) == (10, 20)  # (w, h) as decoded
    assert reader.open(path).size == (10, 20)
    fitted = fit_to_size(reader.open(path), (8, 4))
    assert fitted.original_hw == (20, 10)
