"""Whole-model latency: every benchmarked architecture at batch 1 and 8, with 1 and 2 Numba threads,
on the numba engine, and on the numpy engine (NumPy's own BLAS threads; row `engine=numpy`).

Group per model (``model-mobilenet_v2`` ...), one row per (engine, batch, threads); pedantic mode (each
round is one forward of the batch, after explicit warm-up calls). Random weights: latency does
not depend on the values. Plus the fine-tuning step time (group ``finetune``).
"""

import numpy as np
import pytest

from lightcnn.models import build

from conftest import numba_threads, run, warm

MODELS = ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "squeezenet1_0", "squeezenet1_1"]
ROUNDS = {1: 30, 8: 10}


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, arch, engine="numba"):
    if (arch, engine) not in models:
        models[arch, engine] = build(arch)
        models[arch, engine].engine = engine
    return models[arch, engine]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("arch", MODELS)
def test_model_forward(benchmark, models, arch, batch, threads):
    benchmark.group = f"model-{arch}"
    model = _model(models, arch)
    x = np.random.default_rng(batch).standard_normal((batch,) + model.input_shape).astype(np.float32)
    benchmark.extra_info.update(engine="numba", batch=batch, threads=threads, gflop=2e-9 * model.count_macs() * batch)
    with numba_threads(threads):
        run(benchmark, model.forward, x, rounds=ROUNDS[batch])


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("arch", MODELS)
def test_model_forward_numpy_engine(benchmark, models, arch, batch):
    benchmark.group = f"model-{arch}"
    model = _model(models, arch, "numpy")
    x = np.random.default_rng(batch).standard_normal((batch,) + model.input_shape).astype(np.float32)
    benchmark.extra_info.update(engine="numpy", batch=batch, gflop=2e-9 * model.count_macs() * batch)
    run(benchmark, model.forward, x, rounds=ROUNDS[batch])
    assert model.last_engine == "numpy"


# --------------------------------------------------------------------------- fine-tuning step


def _train_step(net, optimizer, x, labels):
    from lightcnn.kernels.linear import cross_entropy

    logits = net.forward(x, training=True)
    loss, dlogits = cross_entropy(logits, labels)
    net.backward(dlogits)
    optimizer.step()
    return loss


@pytest.mark.benchmark(group="finetune")
@pytest.mark.parametrize("what", ["head-b32", "last-unit+head-b8"])
def test_finetune_step(benchmark, what):
    """One SGD step of head-only fine-tuning on cached pooled features (batch 32), and of
    fine-tuning MobileNetV2's last 1x1 conv + batch norm + head on cached 7x7x320 maps (batch 8)."""
    from lightcnn.layers.base import Sequential
    from lightcnn.optim import SGD

    rng = np.random.default_rng(0)
    model = build("mobilenet_v2", num_classes=1000)
    model.reset_head(5)
    if what == "head-b32":
        net = model.head_after_pool()
        x = rng.standard_normal((32, model.feature_channels)).astype(np.float32)
    else:
        net = Sequential([("last", model.features_net["last"]), ("head", model.head_net)])
        x = rng.standard_normal((8, 7, 7, 320)).astype(np.float32)
    labels = rng.integers(0, 5, x.shape[0])
    optimizer = SGD(net, lr=1e-3)
    warm(_train_step, net, optimizer, x, labels)
    benchmark.pedantic(_train_step, args=(net, optimizer, x, labels), rounds=20, iterations=1, warmup_rounds=1)
