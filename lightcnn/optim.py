"""Optimisers and learning-rate schedules over a model's parameters.

An optimiser walks ``model.named_parameters()`` and updates each array in place
from the gradient its layer stored in ``layer.grads`` (frozen layers store
none and are skipped). Two kinds of regularisation, kept apart on purpose:

- ``l2``: the loss gains lambda * sum(w^2) (seed 000's eq. 3), so the gradient
  gains 2 * lambda * w. With Adam this is *not* weight decay.
- ``weight_decay``: decoupled decay w <- w - lr * wd * w (Loshchilov & Hutter, AdamW).

Biases and batch-norm parameters are excluded from both (standard practice:
decaying them only shrinks offsets and scales). Optimiser state (velocity,
moments, step) is exposed by `state_dict()` so training can resume exactly.
"""

import numpy as np


def _decays(name):
    return name.endswith(".weight") and ".bn." not in name


class Optimizer:
    def __init__(self, model, lr, l2=0.0, weight_decay=0.0):
        self.model = model
        self.lr = float(lr)
        self.l2 = float(l2)
        self.weight_decay = float(weight_decay)
        self.state = {}
        self.steps = 0

    def l2_penalty(self):
        """lambda * sum(w^2) over decayed weights: add it to the reported loss."""
        if not self.l2:
            return 0.0
        return self.l2 * sum(float(np.sum(np.square(v, dtype=np.float64)))
                             for name, layer, key, v in self.model.named_parameters()
                             if not layer.frozen and _decays(name))

    def step(self):
        self.steps += 1
        for name, layer, key, value in self.model.named_parameters():
            grad = layer.grads.get(key)
            if grad is None or layer.frozen:
                continue
            if self.l2 and _decays(name):
                grad = grad + 2.0 * self.l2 * value
            if self.weight_decay and _decays(name):
                value -= self.lr * self.weight_decay * value
            self._update(name, value, grad.astype(value.dtype, copy=False))
        self.model.zero_grads()
        self.model.params_changed()

    def _update(self, name, value, grad):
        raise NotImplementedError

    def state_dict(self):
        return {"steps": self.steps, "lr": self.lr,
                "state": {name: {k: np.array(v) for k, v in s.items()} for name, s in self.state.items()}}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        self.lr = float(state["lr"])
        self.state = {name: {k: np.array(v) for k, v in s.items()} for name, s in state["state"].items()}


class SGD(Optimizer):
    """v <- momentum * v + g;  w <- w - lr * v   (PyTorch's form of momentum)."""

    def __init__(self, model, lr=0.01, momentum=0.9, l2=0.0, weight_decay=0.0):
        super().__init__(model, lr, l2, weight_decay)
        self.momentum = float(momentum)

    def _update(self, name, value, grad):
        if self.momentum:
            s = self.state.setdefault(name, {"velocity": np.zeros_like(value)})
            s["velocity"] *= self.momentum
            s["velocity"] += grad
            grad = s["velocity"]
        value -= self.lr * grad


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction; decoupled weight decay makes it AdamW."""

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, l2=0.0, weight_decay=0.0):
        super().__init__(model, lr, l2, weight_decay)
        self.beta1, self.beta2 = betas
        self.eps = float(eps)

    def _update(self, name, value, grad):
        s = self.state.setdefault(name, {"m": np.zeros_like(value), "v": np.zeros_like(value)})
        s["m"] *= self.beta1
        s["m"] += (1 - self.beta1) * grad
        s["v"] *= self.beta2
        s["v"] += (1 - self.beta2) * grad * grad
        m_hat = s["m"] / (1 - self.beta1 ** self.steps)
        v_hat = s["v"] / (1 - self.beta2 ** self.steps)
        value -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def clip_grad_norm(model, max_norm):
    """Rescale the gradients of `model` so that their global L2 norm is at most `max_norm`
    (torch.nn.utils.clip_grad_norm_: factor max_norm / (norm + 1e-6) when norm exceeds max_norm).

    The norm runs over every gradient an optimiser step would use (frozen layers have none). The scaled
    gradients are new arrays (the layers' own ones are replaced, not written into). Returns the norm
    before clipping.
    """
    grads = [(layer, key) for _, layer, key, _ in model.named_parameters()
             if not layer.frozen and layer.grads.get(key) is not None]
    total = float(np.sqrt(sum(float(np.sum(np.square(layer.grads[key], dtype=np.float64)))
                              for layer, key in grads)))
    if total > max_norm:
        factor = max_norm / (total + 1e-6)
        for layer, key in grads:
            g = layer.grads[key]
            layer.grads[key] = (g * factor).astype(g.dtype, copy=False)
    return total


def step_decay(base_lr, epoch, factor=0.8, every=5):
    """Seed 001's schedule: multiply the rate by `factor` every `every` epochs."""
    return base_lr * factor ** (epoch // every)
