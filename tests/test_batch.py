"""The typed batch: what moves to the device, and that it survives loader workers and
accelerate's prepared loader."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device

from sipo_plugin.data import PairBatch, collate_pairs


def item(i: int) -> dict:
    return {"prompt": f"p{i}", "chosen": torch.full((3, 2, 2), float(i)),
            "rejected": torch.full((3, 2, 2), -float(i)), "weight": 1.0 + i, "index": i,
            "original_size": ((4, 5), (6, 7)), "crop_top_left": ((0, 1), (0, 0)),
            "target_size": (2, 2)}


class Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return item(i)


def test_send_to_device_moves_the_model_inputs_and_keeps_the_bookkeeping_on_the_host():
    batch = PairBatch(**{**vars(collate_pairs([item(0), item(1)])),
                         "cond": {"encoder_hidden_states": torch.zeros(2, 3, 4)},
                         "reference_errors": torch.ones(4), "reference_draw": torch.tensor([0, 2])})
    moved = send_to_device(batch, torch.device("meta"))  # what accelerate's loader calls
    assert isinstance(moved, PairBatch)
    for tensor in (moved.pixel_values, moved.cond["encoder_hidden_states"],
                   moved.extras["original_sizes"], moved.reference_errors):
        assert tensor.device.type == "meta"
    for tensor in (moved.weights, moved.indices, moved.reference_draw):
        assert tensor.device.type == "cpu"
    assert moved.prompts == ["p0", "p1"] and moved.latents is None
    assert batch.pixel_values.device.type == "cpu"  # the original is left as it was


def test_batches_cross_worker_processes_and_accelerates_prepared_loader():
    loader = torch.utils.data.DataLoader(Items(), batch_size=2, collate_fn=collate_pairs,
                                         num_workers=1)
    prepared = Accelerator(cpu=True).prepare(loader)
    batches = list(prepared)
    assert all(isinstance(b, PairBatch) for b in batches)
    assert [b.indices.tolist() for b in batches] == [[0, 1], [2, 3]]
    assert batches[1].pixel_values[:, 0, 0, 0].tolist() == [2, 3, -2, -3]  # winners first
    assert batches[1].extras["original_sizes"].tolist() == [[4, 5], [4, 5], [6, 7], [6, 7]]
    assert batches[1].weights.tolist() == [3.0, 4.0] and batches[1].num_pairs == 2
