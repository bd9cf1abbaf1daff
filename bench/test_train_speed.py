"""Head-only training speed on cached features (the issue's target: one epoch <= 1 s on 2 cores).

Run only when asked:  python -m pytest bench/test_train_speed.py --benchmark-enable

Shapes are those of covid-ct-ucsd's official training split: 425 images, MobileNetV2's 1280 pooled features,
5 cached views per image, 118 validation images; batch 32. The first round compiles the Numba kernels, so
warmup is on.
"""

import numpy as np
import pytest

from lightcnn.train import TrainConfig, build_head, fit, train_head

N_TRAIN, N_VAL, FEATURES, VIEWS = 425, 118, 1280, 5


@pytest.fixture(scope="module")
def cached():
    rng = np.random.default_rng(0)
    y = np.arange(N_TRAIN) % 2
    x = rng.standard_normal((VIEWS, N_TRAIN, FEATURES)).astype(np.float32) + y[None, :, None] * 0.1
    yv = np.arange(N_VAL) % 2
    xv = rng.standard_normal((N_VAL, FEATURES)).astype(np.float32) + yv[:, None] * 0.1
    return x, y, xv, yv


@pytest.mark.benchmark(group="train-head", warmup=True)
@pytest.mark.parametrize("head", ["linear", "dense"])
def test_head_only_epoch(benchmark, cached, head):
    """One epoch (14 batches + validation) of a linear / seed-003 dense head on cached features."""
    x, y, xv, yv = cached
    config = TrainConfig(epochs=1, head=head, hidden_dropout=0.2 if head == "dense" else 0.0)
    net = build_head(FEATURES, 2, config.hidden_layers, config.dropout, config.hidden_dropout, config.seed)
    result = benchmark(fit, net, x, y, xv, yv, config, num_classes=2, one_thread=True)
    assert len(result.history) == 1
    if benchmark.stats is not None:  # None in smoke mode (--benchmark-disable): nothing was timed
        assert benchmark.stats.stats.median < 1.0  # the target: a head-only epoch under 1 s


@pytest.mark.benchmark(group="train-head", warmup=True)
def test_thirty_head_epochs(benchmark, cached):
    """What a tuning trial costs: train_head for 30 epochs (builds the head, keeps the best weights)."""
    x, y, xv, yv = cached
    params, history, best = benchmark(train_head, x, y, xv, yv, {"epochs": 30})
    assert len(history) == 30
