"""kappa = "auto" gives one answer (issue 10, point 7): the same calibration pairs and draws
whatever train_batch_size is, and the trainer and --analyze agree."""

import pytest
import torch

from sipo_plugin.analysis.run import analysis_kappa
from sipo_plugin.analysis.collect import load_for_analysis, weight_settings
from sipo_plugin.data import read_pairs
from sipo_plugin.training.config import load_config
from sipo_plugin.training.loop import calibration_pairs, objective_for_run
from test_training import load_adapter


class Log:
    def info(self, text):
        pass

    def event(self, name, **values):
        self.calibrated = values


def calibration_config(manifest, tmp_path, batch_size: int, *extra: str):
    return load_config(None, ["--train_data", str(manifest), "--resolution", "32",
                              "--output_dir", str(tmp_path / "run"), "--objective", "sipo",
                              "--train_batch_size", str(batch_size), "--calibration_pairs", "6",
                              "--seed", "3", *extra])


def trainer_kappa(config) -> float:
    adapter = load_adapter(config)
    adapter.add_trainable(config.network)
    records = read_pairs(config.data.train_data)
    return objective_for_run(config, adapter, records, None, Log()).config.kappa


def test_calibration_pairs_are_fixed_by_seed_not_batch_size(manifest, tmp_path):
    pairs = {b: calibration_pairs(calibration_config(manifest, tmp_path, b), 8) for b in (1, 2, 4)}
    assert pairs[1] == pairs[2] == pairs[4] and len(set(pairs[1])) == 6
    other_seed = calibration_pairs(calibration_config(manifest, tmp_path, 1, "--seed", "4"), 8)
    assert other_seed != pairs[1]


def test_kappa_is_equal_across_batch_sizes_and_equal_to_analyze(manifest, tmp_path):
    kappas = [trainer_kappa(calibration_config(manifest, tmp_path, b)) for b in (1, 2, 4)]
    assert kappas[0] > 0
    assert kappas[1] == pytest.approx(kappas[0], rel=1e-4)
    assert kappas[2] == pytest.approx(kappas[0], rel=1e-4)
    config = calibration_config(manifest, tmp_path, 2)
    adapter, _, reference, checkpoint = load_for_analysis(config)
    analysed, source = analysis_kappa(config, adapter, reference, weight_settings(config), checkpoint)
    assert source.startswith("calibrated") and analysed == pytest.approx(kappas[0], rel=1e-4)
    torch.manual_seed(0)  # other global draws do not move it (the draws are keyed per pair)
    assert trainer_kappa(calibration_config(manifest, tmp_path, 4)) == pytest.approx(kappas[0], rel=1e-4)
