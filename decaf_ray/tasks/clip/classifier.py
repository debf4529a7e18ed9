"""CLIP's zero-shot classifier as a trainable head: cosine logits against the class prompts, and
its evaluation over a test set, shared by the CLIP task and the stand-in pretraining.

The logit of image i for class c is ``scale * <f_i, t_c>``, with f_i the normalised image
features (m, e) and t_c the normalised text features (C, e) of ``prompt.format(class_name)``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def logits(image_features: Tensor, text_features: Tensor, scale: float) -> Tensor:
    """(m, C) float32 logits of normalised image features (m, e) against text features (C, e)."""
    return scale * (image_features @ text_features.T).float()


@torch.no_grad()
def evaluate(image_features: Callable[[np.ndarray], Tensor], text_features: Tensor,
             labels: np.ndarray, scale: float, batch_size: int,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, float]:
    """``test_loss`` (mean cross-entropy) and ``test_accuracy`` of the classifier over a test set.

    ``image_features(part)`` gives the normalised features (len(part), e) of the test images at
    indices ``part``, taken ``batch_size`` at a time in order; ``labels`` (n,) are their classes;
    the features and logits of a batch are computed inside ``autocast()``. An empty test set
    gives ``{}``.
    """
    n = len(labels)
    if n == 0:
        return {}
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        part = np.arange(start, min(n, start + batch_size))
        y = torch.as_tensor(labels[part], device=text_features.device)
        with autocast():
            out = logits(image_features(part), text_features, scale)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    return {"test_loss": loss_sum / n, "test_accuracy": correct / n}
