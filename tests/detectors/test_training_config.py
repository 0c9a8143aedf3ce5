"""Training settings: how the layers (preset, detector, call) merge, and what null means."""

from __future__ import annotations

import pytest

from mgral.detectors.training import make_config
from mgral.errors import ConfigError


def test_later_layers_win_and_a_length_replaces_the_other_length():
    config = make_config({"epochs": 10, "lr": 0.02}, {"iterations": 50}, {"lr": 0.005})
    assert (config.epochs, config.iterations, config.lr) == (None, 50, 0.005)
    config = make_config({"iterations": 50}, {"epochs": 3})
    assert (config.epochs, config.iterations) == (3, None)


def test_null_turns_a_setting_off_but_a_null_length_is_not_set():
    config = make_config({"iterations": 40}, {"scale_jitter": None, "grad_clip": None, "amp": None, "epochs": None})
    assert config.scale_jitter is None and config.grad_clip is None and config.amp is None
    assert (config.epochs, config.iterations) == (None, 40)
    assert make_config({}).scale_jitter == (0.8, 1.25)  # the default jitters


def test_bad_settings_name_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError, match="lr: Input should be a valid number"):
        make_config({"lr": None})
    with pytest.raises(ConfigError, match="valid keys: epochs, iterations, min_iterations, batch_size"):
        make_config({"learning_rate": 0.1})


def test_epochs_follow_the_training_images_with_a_floor():
    from mgral.detectors.training import schedule_length

    config = make_config({"epochs": 3, "batch_size": 4, "min_iterations": 10})
    assert schedule_length(config, 8) == 10  # 3 epochs of 2 steps: the floor holds
    assert schedule_length(config, 40) == 30  # 3 epochs of 10 steps: above it
    assert schedule_length(config, 41) == 33  # a partial batch is a step
    assert schedule_length(config, 40, world=2) == 15  # each step takes a batch per process
    config = make_config({"iterations": 6, "min_iterations": 10})
    assert schedule_length(config, 1000) == 10  # the floor holds over a fixed length too
    assert schedule_length(make_config({"epochs": 2, "batch_size": 4}), 9) == 6  # no floor by default


def test_training_runs_the_floor(squares):
    from mgral.detectors.torchvision_detector import TorchvisionDetector

    det = TorchvisionDetector(
        "tiny",
        squares.categories,
        device="cpu",
        seed=0,
        pretrained=False,
        train={"progress": False, "batch_size": 4, "warmup_iters": 0, "epochs": 1, "min_iterations": 3},
    )
    ids = squares.image_ids("train")[:4]  # one step per epoch
    summary = det.fit(squares, ids)
    assert (summary["iterations"], summary["epochs"]) == (3, 3)
