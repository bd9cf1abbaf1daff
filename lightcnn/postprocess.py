"""Logits -> probabilities -> top-k answers with class names."""

from typing import NamedTuple

import numpy as np


class Prediction(NamedTuple):
    index: int      # class index in the model's output
    wnid: str       # class id (WordNet ID for ImageNet) or the class name when the model has none
    label: str      # human-readable class name
    score: float    # probability

    def to_dict(self):
        return {"index": self.index, "wnid": self.wnid, "label": self.label, "score": round(float(self.score), 6)}


def softmax(logits):
    """Row-wise softmax of (N, K) logits, computed in float64 for stable small probabilities."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def topk(probs, k, class_names, class_ids=None):
    """For each row of (N, K) probabilities, the k best Predictions, highest first (ties: lower index first)."""
    probs = np.asarray(probs)
    k = max(1, min(int(k), probs.shape[1]))
    ids = class_ids if class_ids is not None else class_names
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([Prediction(int(i), str(ids[i]), str(class_names[i]), float(row[i])) for i in order])
    return out
