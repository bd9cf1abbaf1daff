"""The papers' training protocols (issue 12): batch-norm modes against PyTorch, architecture variants of
pretrained weights, which layers train, fresh augmentation, schedules, clipping and the divergence guard."""

import numpy as np
import pytest

from lightcnn.kernels.linear import cross_entropy
from lightcnn.layers import Dense, GlobalAvgPool, Sequential, conv_bn_act
from lightcnn.models import Model, mobilenet_v2
from lightcnn.models.base import randomise_batchnorm_statistics
from lightcnn.optim import SGD
from lightcnn.train import trainable_net
from lightcnn.train.bn import batchnorm_layers, rebuild, recalibrate, unfold_batchnorm

PARITY_TOL = 1e-4  # float32 on both sides, 5 SGD steps


def _bn_net(seed=0):
    """stem conv-BN-ReLU, depthwise conv-BN-ReLU6 (stride 2), pointwise conv-BN, GAP, dense: (N,12,12,3) -> (N,3)."""
    rng = np.random.default_rng(seed)
    features = Sequential([("stem", conv_bn_act(3, 8, 3, act="relu", rng=rng)),
                           ("dw", conv_bn_act(8, 8, 3, 2, act="relu6", depthwise=True, rng=rng)),
                           ("pw", conv_bn_act(8, 16, 1, rng=rng))])
    features.out_ch = 16
    head = Sequential([("pool", GlobalAvgPool()), ("classifier", Dense(16, 3, rng=rng, init="glorot"))])
    model = Model("bn_net", {}, features, head, (12, 12, 3))
    return randomise_batchnorm_statistics(model, rng)


def _torch_twin(model):
    """The same network in PyTorch (NCHW, OIHW) holding the same numbers."""
    torch = pytest.importorskip("torch", reason="PyTorch parity needs torch (pip install torch==2.13.0)")
    nn = torch.nn
    f = model.features_net
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    t = torch.from_numpy
    with torch.no_grad():
        net[0].weight.copy_(t(f["stem"].conv.params["weight"].transpose(3, 2, 0, 1).copy()))
        net[3].weight.copy_(t(f["dw"].conv.params["weight"].transpose(2, 0, 1)[:, None].copy()))
        net[6].weight.copy_(t(f["pw"].conv.params["weight"].transpose(3, 2, 0, 1).copy()))
        for i, name in ((1, "stem"), (4, "dw"), (7, "pw")):
            bn = f[name].bn
            net[i].weight.copy_(t(bn.params["weight"]))
            net[i].bias.copy_(t(bn.params["bias"]))
            net[i].running_mean.copy_(t(bn.buffers["running_mean"]))
            net[i].running_var.copy_(t(bn.buffers["running_var"]))
        net[10].weight.copy_(t(model.head_net["classifier"].params["weight"].T.copy()))
        net[10].bias.copy_(t(model.head_net["classifier"].params["bias"]))
    return net


def _torch_weights(net):
    """lightcnn names -> arrays in lightcnn layouts, from the torch twin."""
    out = {}
    conv = {0: "stem", 3: "dw", 6: "pw"}
    for i, name in conv.items():
        w = net[i].weight.detach().numpy()
        out[f"features.{name}.conv.weight"] = w[:, 0].transpose(1, 2, 0) if name == "dw" else w.transpose(2, 3, 1, 0)
    for i, name in ((1, "stem"), (4, "dw"), (7, "pw")):
        bn = net[i]
        out[f"features.{name}.bn.weight"] = bn.weight.detach().numpy()
        out[f"features.{name}.bn.bias"] = bn.bias.detach().numpy()
        out[f"features.{name}.bn.running_mean"] = bn.running_mean.numpy()
        out[f"features.{name}.bn.running_var"] = bn.running_var.numpy()
    out["head.classifier.weight"] = net[10].weight.detach().numpy().T
    out["head.classifier.bias"] = net[10].bias.detach().numpy()
    return out


def test_bn_train_matches_pytorch_over_five_sgd_steps():
    """--bn train is PyTorch's model.train(): batch statistics, running stats with momentum 0.1 and the unbiased
    variance, gamma/beta trained. Five SGD steps (momentum 0.9) on the same batches give the same losses,
    weights and running statistics within 1e-4."""
    torch = pytest.importorskip("torch", reason="PyTorch parity needs torch (pip install torch==2.13.0)")
    model = _bn_net()
    twin = _torch_twin(model)
    net = trainable_net(model, "all", train_bn=True)
    assert all(not bn.frozen for _, bn in batchnorm_layers(net))
    opt = SGD(net, lr=0.05, momentum=0.9)
    topt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    twin.train()
    rng = np.random.default_rng(1)
    loss_diff = []
    for _ in range(5):
        x = rng.normal(0, 1, (6, 12, 12, 3)).astype(np.float32)
        y = rng.integers(0, 3, 6)
        loss, dlogits = cross_entropy(net.forward(x, True), y)
        net.backward(dlogits)
        opt.step()
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())),
                                                  torch.from_numpy(y))
        tloss.backward()
        topt.step()
        loss_diff.append(abs(float(loss) - tloss.item()))
    ours = net.state_dict()
    theirs = _torch_weights(twin)
    weight_diff = {name: float(np.max(np.abs(ours[name] - theirs[name]))) for name in theirs}
    print(f"\nPyTorch parity after 5 steps: max loss diff {max(loss_diff):.2e}, "
          f"max weight/stat diff {max(weight_diff.values()):.2e}")
    assert max(loss_diff) < PARITY_TOL, loss_diff
    assert max(weight_diff.values()) < PARITY_TOL, weight_diff
    # and the training moved them: the comparison is not of two untouched copies
    assert np.max(np.abs(ours["features.stem.bn.running_mean"] - _bn_net().state_dict()[
        "features.stem.bn.running_mean"])) > 1e-2


def test_recalibrate_matches_pytorch_momentum_none():
    """--bn recalibrate: running statistics = equal-weight average of the batch statistics (batch-normalised
    forward), as torch with momentum=None after reset_running_stats(); the weights do not change."""
    torch = pytest.importorskip("torch", reason="PyTorch parity needs torch (pip install torch==2.13.0)")
    model = _bn_net(seed=3)
    twin = _torch_twin(model)
    rng = np.random.default_rng(2)
    batches = [rng.normal(0.5, 2.0, (5, 12, 12, 3)).astype(np.float32) for _ in range(3)]
    before = {k: v.copy() for k, v in model.state_dict().items()}
    layers = [bn for _, bn in batchnorm_layers(model.features_net)]
    for bn in layers:
        bn.frozen = True  # recalibration ignores the frozen flag: it is what runs before frozen training
    assert recalibrate(model, iter(batches), layers) == 3
    for m in twin.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    twin.train()
    with torch.no_grad():
        for x in batches:
            twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    ours, theirs = model.state_dict(), _torch_weights(twin)
    for name, value in theirs.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
        if "running" not in name:
            np.testing.assert_array_equal(ours[name], before[name], err_msg=name)
    assert np.max(np.abs(ours["features.dw.bn.running_var"] - before["features.dw.bn.running_var"])) > 0.1


def _folded_mobilenet(seed=0):
    """A tiny MobileNetV2 as TFLite files come: no batch norm, every conv with a bias (random, non-zero)."""
    rng = np.random.default_rng(seed)
    model = mobilenet_v2(width_mult=0.35, num_classes=4, bn=False, padding="tf", seed=seed)
    for _, layer, key, value in model.named_parameters():
        if key == "bias":
            layer.params[key] = rng.normal(0, 0.2, value.shape).astype(np.float32)
    model.params_changed()
    return model


def test_unfolded_batchnorm_computes_the_same_function_and_recalibration_tames_elu():
    """unfold_batchnorm puts a BN behind every conv of a folded file without changing the outputs; an ELU
    rebuild of the same weights drifts (pooled features far from the ReLU6 network's), and recalibrating every
    BN on the same images brings the pooled features back near the original ones."""
    model = _folded_mobilenet()
    rng = np.random.default_rng(5)
    images = [rng.normal(0, 1, (6, 32, 32, 3)).astype(np.float32) for _ in range(3)]
    unfolded = unfold_batchnorm(model, lambda: iter(images))
    assert unfolded.config["bn"] is True and len(batchnorm_layers(unfolded.features_net)) == 52
    x = images[0]
    np.testing.assert_allclose(unfolded.forward(x), model.forward(x), atol=1e-4)

    pooled = lambda m: np.mean(m.features(np.concatenate(images)), axis=(1, 2))  # noqa: E731
    reference = pooled(model)
    elu = rebuild(unfolded, activation="elu")
    assert elu.config["activation"] == "elu"
    drift = np.abs(pooled(elu) - reference).mean()
    recalibrate(elu, iter(images), [bn for _, bn in batchnorm_layers(elu.features_net)])
    after = np.abs(pooled(elu) - reference).mean()
    assert after < 0.3 * drift, (drift, after)


# --------------------------------------------------------------------------------------------- through the CLI

from lightcnn.checkpoint import read_checkpoint  # noqa: E402
from lightcnn.finetune import main as finetune_cli_main  # noqa: E402
from tests.test_finetune_cli import _run, workspace  # noqa: E402,F401  (the tiny image folder and weights)


def _tensors(path):
    return read_checkpoint(path).tensors


@pytest.mark.parametrize("mode", ["frozen", "train", "recalibrate"])
def test_bn_modes_in_last_k(workspace, mode):
    """frozen: every BN tensor of best.h5 equals the base's. train: the unfrozen block's running statistics
    and gamma/beta move, the frozen prefix's stay bit-identical. recalibrate: the unfrozen block's running
    statistics are re-estimated, its gamma/beta (trained frozen) and the prefix stay bit-identical."""
    out = workspace / f"run_bn_{mode}"
    assert _run(workspace, out, "--mode", "last-k", "--unfreeze", "1", "--bn", mode, "--epochs", "2",
                "--optimizer", "sgd", "--lr", "0.01") == 0
    base, best = _tensors(workspace / "tiny.h5"), _tensors(out / "best.h5")
    import json

    config = json.loads((out / "config.json").read_text())
    assert config["bn"] == mode and config["resolved"]["bn"] == mode
    trained = "features.blocks.16.project.bn"
    frozen = "features.blocks.3.project.bn"
    for key in ("running_mean", "running_var", "weight", "bias"):
        np.testing.assert_array_equal(best[f"{frozen}.{key}"], base[f"{frozen}.{key}"])
    moved = {key: not np.array_equal(best[f"{trained}.{key}"], base[f"{trained}.{key}"])
             for key in ("running_mean", "running_var", "weight", "bias")}
    expected = {"frozen": dict.fromkeys(moved, False),
                "train": dict.fromkeys(moved, True),
                "recalibrate": {"running_mean": True, "running_var": True, "weight": False, "bias": False}}[mode]
    assert moved == expected


def test_activation_variant_keeps_the_weights_and_recalibrates_by_default(workspace, capsys):
    """--activation elu on MobileNetV2 weights: bn defaults to recalibrate, every BN of the trunk (the frozen
    part computes anew too) gets new running statistics, the conv weights of the frozen part stay the file's
    bit for bit, best.h5 is an ELU network, and one note says the function changed."""
    import json

    out = workspace / "run_elu"
    assert _run(workspace, out, "--mode", "last-k", "--freeze-first", "15", "--activation", "elu", "--epochs", "1",
                "--quiet") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["activation"] == "elu" and config["bn"] == "recalibrate"
    assert config["resolved"]["recalibrated_batchnorms"] == 52
    base, best = _tensors(workspace / "tiny.h5"), _tensors(out / "best.h5")
    np.testing.assert_array_equal(best["features.blocks.3.dw.conv.weight"], base["features.blocks.3.dw.conv.weight"])
    assert not np.array_equal(best["features.blocks.3.dw.bn.running_var"], base["features.blocks.3.dw.bn.running_var"])
    assert read_checkpoint(out / "best.h5").config["activation"] == "elu"
    capsys.readouterr()
    again = workspace / "run_elu_loud"
    assert finetune_cli_main([str(workspace / "data"), "--weights", str(workspace / "tiny.h5"), "--out", str(again),
                              "--cache-dir", str(workspace / "cache"), "--bootstrap", "0", "--activation", "elu",
                              "--epochs", "1"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "changes the function" in line]
    assert len(notes) == 1 and "relu6" in notes[0] and "recalibrated" in notes[0]


def test_folded_weights_with_elu_get_batchnorm_back(workspace, tmp_path):
    """A folded (TFLite-style, bn=False) file fine-tuned with --activation elu: best.h5 is a bn=True ELU network
    whose prefix convs are the file's weights, and it classifies through lightcnn.load."""
    import lightcnn
    from lightcnn.checkpoint import Checkpoint, save_checkpoint
    from lightcnn.preprocess import Preprocessing

    model = _folded_mobilenet()
    path = workspace / "folded.h5"
    save_checkpoint(path, Checkpoint(arch=model.arch, config=model.config, tensors=model.state_dict(),
                                     class_names=[f"c{i}" for i in range(4)],
                                     preprocessing=Preprocessing(size=32, resize="shorter",
                                                                 resize_size=36).to_dict()))
    from lightcnn.finetune import main as finetune_main

    out = tmp_path / "run"
    assert finetune_main([str(workspace / "data"), "--weights", str(path), "--out", str(out), "--quiet",
                          "--cache-dir", str(tmp_path / "cache"), "--activation", "elu", "--mode", "last-k",
                          "--unfreeze", "2", "--epochs", "1", "--bootstrap", "0"]) == 0
    ckpt = read_checkpoint(out / "best.h5")
    assert ckpt.config["bn"] is True and ckpt.config["activation"] == "elu"
    np.testing.assert_array_equal(ckpt.tensors["features.blocks.2.expand.conv.weight"],
                                  model.state_dict()["features.blocks.2.expand.conv.weight"])
    probs = lightcnn.load(str(out / "best.h5")).predict([str(workspace / "data" / "blobs" / "00.png")])
    assert probs.shape == (1, 2) and np.all(np.isfinite(probs))


def test_convert_accepts_an_activation_variant(tmp_path, sources_dir):
    """weights convert --config '{"activation": "elu"}' on the quantised TFLite MobileNetV2 used to stop with
    "no rule for activation 'elu'" (the 8-bit grids belong to ReLU6); now it writes the same tensors as an ELU
    network, without the grids, and says the function changed."""
    import os
    import subprocess
    import sys

    src = next(sources_dir.rglob("mobilenet_v2_quant_tflite/mobilenet_v2_1.0_224_quant.tflite"))
    env = dict(os.environ, LIGHTCNN_SOURCES=str(sources_dir))
    outs = {}
    for label, extra in (("elu", ["--config", '{"activation": "elu"}']), ("plain", [])):
        outs[label] = tmp_path / f"{label}.h5"
        result = subprocess.run([sys.executable, "-m", "lightcnn.weights", "convert", str(src), "--arch",
                                 "mobilenet_v2", "-o", str(outs[label]), *extra], capture_output=True, text=True,
                                env=env, timeout=600)
        assert result.returncode == 0, result.stderr
        if label == "elu":
            assert "changes the function" in result.stderr
    elu, plain = read_checkpoint(outs["elu"]), read_checkpoint(outs["plain"])
    assert elu.config["activation"] == "elu" and plain.config["activation"] == "relu6"
    assert "activation_quantization" not in elu.extra and elu.extra["architecture_variant"] == {"activation": "elu"}
    assert elu.tensors.keys() == plain.tensors.keys()
    for name, value in plain.tensors.items():
        np.testing.assert_array_equal(elu.tensors[name], value, err_msg=name)


def test_freeze_first_trains_only_the_blocks_after_k(workspace):
    """--freeze-first 14 on the 17-block MobileNetV2: blocks 0-13 (and the stem) bit-identical after training,
    blocks 14-16 and the last conv changed."""
    import json

    out = workspace / "run_freeze_first"
    assert _run(workspace, out, "--mode", "last-k", "--freeze-first", "14", "--epochs", "2", "--optimizer", "sgd",
                "--lr", "0.05") == 0
    base, best = _tensors(workspace / "tiny.h5"), _tensors(out / "best.h5")
    for i in range(17):
        name = f"features.blocks.{i}.project.conv.weight"
        assert np.array_equal(best[name], base[name]) == (i < 14), name
    np.testing.assert_array_equal(best["features.stem.conv.weight"], base["features.stem.conv.weight"])
    assert not np.array_equal(best["features.last.conv.weight"], base["features.last.conv.weight"])
    resolved = json.loads((out / "config.json").read_text())["resolved"]["unfreeze"]
    assert resolved["unfreeze"] == 3 and resolved["blocks"] == [
        "features.blocks.14", "features.blocks.15", "features.blocks.16", "features.last"]


def test_unfreeze_share_picks_the_nearest_block_boundary(workspace, capsys):
    """--unfreeze 40%: MobileNetV2 has 52 weight layers (stem 1, block 0 two, blocks 1-16 three each, last 1);
    the last k blocks + last hold 3k + 1, nearest to 20.8 at k = 7 (22 layers, 42.3 %). The stderr line and
    config.json say so."""
    import json

    from lightcnn.train.features import resolve_unfreeze

    model = mobilenet_v2()
    k, info = resolve_unfreeze(model, "40%")
    assert k == 7 and info["weight_layers"] == [22, 52] and info["share"] == round(22 / 52, 4)
    assert resolve_unfreeze(model, "100%")[0] == 17 and resolve_unfreeze(model, "1%")[0] == 1
    assert resolve_unfreeze(model, 4)[0] == 4 and resolve_unfreeze(model, 2, freeze_first=6)[0] == 11

    out = workspace / "run_unfreeze_share"
    assert finetune_cli_main([str(workspace / "data"), "--weights", str(workspace / "tiny.h5"), "--out", str(out),
                              "--cache-dir", str(workspace / "cache"), "--bootstrap", "0", "--mode", "last-k",
                              "--unfreeze", "40%", "--epochs", "1"]) == 0
    lines = [t for t in capsys.readouterr().err.splitlines() if t.startswith("--unfreeze 40%")]
    assert len(lines) == 1 and "features.blocks.10 ... features.last" in lines[0] and "22 of 52" in lines[0]
    config = json.loads((out / "config.json").read_text())
    assert config["unfreeze"] == "40%" and config["resolved"]["unfreeze"]["unfreeze"] == 7


def test_freeze_first_counts_fire_modules_on_squeezenet():
    """SqueezeNet 1.0 has 8 Fire modules: --freeze-first 3 trains fire5..fire9 (with the pool between them)."""
    from lightcnn.models import squeezenet1_0
    from lightcnn.train.features import resolve_unfreeze

    k, info = resolve_unfreeze(squeezenet1_0(), None, freeze_first=3)
    assert k == 5
    assert info["blocks"] == ["features.fire5", "features.fire6", "features.fire7", "features.fire8",
                              "features.pool3", "features.fire9"]


# --------------------------------------------------------------------------------------------- item 4


def test_schedules_give_the_closed_form_rates_per_epoch():
    """lr_at against the numbers written out: multi-step (torch MultiStepLR stepped per epoch), cosine
    (CosineAnnealingLR, eta_min 0), linear warm-up followed by cosine, and the old step decay unchanged."""
    import math

    from lightcnn.train.loop import lr_at

    def rates(epochs=6, **kw):
        cfg = TrainConfig(lr=1.0, epochs=epochs, **kw)
        return [lr_at(cfg, e) for e in range(epochs)]

    from lightcnn.train import TrainConfig

    assert rates(lr_schedule="multistep", lr_milestones=[2, 4]) == pytest.approx([1, 1, .1, .1, .01, .01])
    assert rates(lr_schedule="multistep", lr_milestones=[3], lr_gamma=0.5) == pytest.approx([1, 1, 1, .5, .5, .5])
    assert rates(4, lr_schedule="cosine") == pytest.approx([1, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                                             (1 + math.cos(3 * math.pi / 4)) / 2])
    assert rates(6, lr_schedule="cosine", warmup_epochs=2) == pytest.approx(
        [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2])
    assert rates(4, warmup_epochs=4) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates(11, lr_decay=0.8, lr_decay_every=5) == pytest.approx([1] * 5 + [0.8] * 5 + [0.64])
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(lr_schedule="multistep")


def test_fit_uses_the_schedule_and_the_cli_records_it(workspace):
    """metrics.csv's lr column is the multi-step schedule after a warm-up epoch, and config.json replays it."""
    import csv
    import json

    out = workspace / "run_sched"
    assert _run(workspace, out, "--epochs", "4", "--lr", "0.01", "--lr-milestones", "2,3", "--lr-gamma", "0.5",
                "--warmup-epochs", "1", "--clip-grad-norm", "5") == 0
    with open(out / "metrics.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs == pytest.approx([0.01, 0.01, 0.005, 0.0025])
    train = json.loads((out / "config.json").read_text())["train"]
    assert (train["lr_schedule"], train["lr_milestones"], train["lr_gamma"], train["warmup_epochs"],
            train["clip_grad_norm"]) == ("multistep", [2, 3], 0.5, 1, 5.0)


def test_clip_grad_norm_bounds_the_global_norm():
    """Above the bound the gradients are scaled to global norm X (directions kept, as
    torch.nn.utils.clip_grad_norm_); below it they are left alone; frozen layers are not counted."""
    from lightcnn.optim import clip_grad_norm

    model = _bn_net()
    net = trainable_net(model, "all")
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (4, 12, 12, 3)).astype(np.float32)
    _, dlogits = cross_entropy(net.forward(x, True), np.array([0, 1, 2, 0]))
    net.backward(dlogits * 1000)
    grads = {n: layer.grads[k].copy() for n, layer, k, _ in net.named_parameters() if k in layer.grads}
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    assert clip_grad_norm(net, 0.5) == pytest.approx(norm, rel=1e-6) and norm > 0.5
    after = {n: layer.grads[k] for n, layer, k, _ in net.named_parameters() if k in layer.grads}
    assert np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in after.values())) == pytest.approx(0.5, rel=1e-5)
    for name, g in grads.items():
        np.testing.assert_allclose(after[name], g * (0.5 / (norm + 1e-6)), rtol=1e-5, atol=1e-12)
    kept = {n: g.copy() for n, g in after.items()}
    assert clip_grad_norm(net, 10.0) == pytest.approx(0.5, rel=1e-5)
    for name, g in kept.items():
        np.testing.assert_array_equal(after[name], g)

    # in fit: one SGD step without momentum moves the weights by at most lr * X
    from lightcnn.train import TrainConfig, fit

    model = _bn_net(seed=1)
    net = trainable_net(model, "all")
    before = {n: v.copy() for n, _, _, v in net.named_parameters()}
    xs = rng.normal(0, 1, (1, 8, 12, 12, 3)).astype(np.float32)
    fit(net, xs, np.arange(8) % 3, None, None, TrainConfig(epochs=1, batch_size=8, optimizer="sgd", momentum=0.0,
                                                           lr=1.0, clip_grad_norm=1e-3, dropout=0.0),
        num_classes=3)
    step = np.sqrt(sum(np.sum((v.astype(np.float64) - before[n]) ** 2) for n, _, _, v in net.named_parameters()))
    assert 0 < step <= 1e-3 * (1 + 1e-5)


def test_divergence_guard_names_the_layer_and_the_remedy():
    """A batch norm whose scale overflows makes the first loss nan: the error names the step after which the
    activations leave range (features.pw) and, as nothing was updated yet, suggests --bn recalibrate; the
    state it carries is the last good one (epoch 0)."""
    from lightcnn.errors import TrainingError
    from lightcnn.train import TrainConfig, fit
    from lightcnn.train.loop import diagnose

    model = _bn_net()
    model.features_net["pw"].bn.params["weight"] = np.full(16, 1e38, np.float32)
    model.params_changed()
    net = trainable_net(model, "all")
    x = np.random.default_rng(0).normal(0, 1, (1, 6, 12, 12, 3)).astype(np.float32)
    path, peak = diagnose(net, x[0])
    assert path == "features.pw" and peak > 1e4
    with pytest.raises(TrainingError) as exc:
        fit(net, x, np.arange(6) % 3, None, None, TrainConfig(epochs=2, batch_size=6, dropout=0.0), num_classes=3)
    message = str(exc.value)
    assert "loss became nan at epoch 1 step 1 after lr 0.001" in message
    assert "activations exceed 1e+04 after features.pw" in message and "try --bn recalibrate" in message
    assert "checkpoint" not in message  # fit saves nothing itself (a tuning trial keeps no checkpoint)
    assert exc.value.state.epoch == 0


def test_fresh_augmentation_differs_per_epoch_and_repeats_per_seed(workspace):
    """fresh_views: the same epoch and seed give the same inputs, another epoch or seed other ones, and none of
    them is the plain image; a last-k run with --augment and no --views trains on them."""
    import json

    import lightcnn
    from lightcnn.train.features import fresh_views

    clf = lightcnn.load(str(workspace / "tiny.h5"))
    items = sorted((workspace / "data" / "stripes").glob("*.png"))[:4]
    prep = clf.preprocessing
    make = lambda seed: fresh_views(clf.model, items, prep, "light", seed, 1)  # noqa: E731
    a, b = make(0), make(0)
    e0, e0_again, e1, other = a(0), b(0), a(1), make(1)(0)
    np.testing.assert_array_equal(e0, e0_again)
    assert e0.shape[0] == 4 and not np.allclose(e0, e1) and not np.allclose(e0, other)
    plain = fresh_views(clf.model, items, prep, None, 0, 1)(0)
    assert not np.allclose(e0, plain)

    out = workspace / "run_fresh"
    assert _run(workspace, out, "--mode", "last-k", "--unfreeze", "1", "--augment", "light", "--epochs", "2") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["views"] == 0 and config["augment"]["hflip"] == {"p": 0.5}


def test_fresh_views_do_not_depend_on_the_loader_threads(workspace, monkeypatch):
    """The threaded loader gives, in item order, exactly the views a plain loop over load_view gives."""
    import lightcnn
    from lightcnn.train import features as F

    clf = lightcnn.load(str(workspace / "tiny.h5"))
    items = sorted((workspace / "data").rglob("*.png"))[:9]
    prep = clf.preprocessing
    augmenter = F.make_augmenter(F.augment_config("light"), prep)
    plain_loop = np.stack([F.load_view(p, prep, augmenter, F.epoch_view_rng(p, 3, 7)) for p in items])
    for threads in (1, 3):
        monkeypatch.setattr(F, "_LOADER_THREADS", threads)
        views = F.fresh_views(clf.model, items, prep, "light", 7, "all", batch_size=4)(3)
        np.testing.assert_array_equal(views, plain_loop)


def test_fresh_views_keep_the_decoded_images_within_their_budget(workspace, monkeypatch, tmp_path):
    """The decoded images are kept between epochs (read-only): once epoch 0 has run, the files can be gone and
    epoch 1 is still exactly what a new loader gives; with a budget of one image only that one is kept."""
    import shutil

    import lightcnn
    from lightcnn.train import features as F

    clf = lightcnn.load(str(workspace / "tiny.h5"))
    prep = clf.preprocessing
    for crop_preset in ("light", "seed001"):  # random_resized_crop keeps the whole decoded image; seed001 the S x S one
        copies = []
        for i, p in enumerate(sorted((workspace / "data").rglob("*.png"))[:5]):
            copies.append(tmp_path / crop_preset / f"{i}.png")
            copies[-1].parent.mkdir(exist_ok=True)
            shutil.copy(p, copies[-1])
        expected = F.fresh_views(clf.model, copies, prep, crop_preset, 3, "all")(1)
        one_image = F.augment_source(copies[0], prep, F.make_augmenter(F.augment_config(crop_preset), prep)).nbytes
        monkeypatch.setattr(F, "_SOURCE_CACHE_BYTES", one_image)
        budgeted = F.fresh_views(clf.model, copies, prep, crop_preset, 3, "all")
        monkeypatch.undo()
        views = F.fresh_views(clf.model, copies, prep, crop_preset, 3, "all")
        views(0), budgeted(0)
        for path in copies[1:]:
            path.unlink()
        np.testing.assert_array_equal(views(1), expected)
        with pytest.raises(Exception, match=r"[1-4]\.png: no such file"):  # the budget kept one image, not these
            budgeted(1)


def test_input_size_travels_to_best_h5(workspace):
    """--input-size 48 on 32-pixel weights: best.h5 preprocesses to 48 (resize side scaled 36 -> 54) and
    predicts at that size."""
    import lightcnn

    out = workspace / "run_size"
    assert _run(workspace, out, "--input-size", "48", "--epochs", "1") == 0
    clf = lightcnn.load(str(out / "best.h5"))
    assert clf.preprocessing.size == 48 and clf.preprocessing.resize_size == 54 and clf.input_shape == (48, 48, 3)
    x = clf.preprocess([str(workspace / "data" / "blobs" / "00.png")])
    assert x.shape == (1, 48, 48, 3)
    assert clf.model.features(x).shape[1:3] == (2, 2)  # 48 / 32 = stride 32 of the trunk: 2 x 2 maps


def test_config_replays_the_protocol_options(workspace):
    """Every new option is in config.json and `--config` runs it again unchanged."""
    import json

    first = workspace / "replay_protocol"
    assert _run(workspace, first, "--mode", "last-k", "--unfreeze", "40%", "--bn", "train", "--activation", "elu",
                "--input-size", "40", "--augment", "seed002", "--lr-schedule", "cosine", "--warmup-epochs", "1",
                "--clip-grad-norm", "2", "--epochs", "2") == 0
    saved = json.loads((first / "config.json").read_text())
    assert (saved["unfreeze"], saved["bn"], saved["activation"], saved["input_size"]) == ("40%", "train", "elu", 40)
    again = workspace / "replay_protocol_b"
    assert finetune_cli_main(["--config", str(first / "config.json"), "--out", str(again), "--quiet"]) == 0
    assert json.loads((again / "config.json").read_text()) == {**saved, "out": str(again)}
