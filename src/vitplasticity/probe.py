"""Linear-probing baseline (study-spec §5): frozen model, mean-pooled last-block tokens
(before the final norm), L2-normalised, StandardScaler + logistic regression."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vitplasticity import transforms
from vitplasticity.components import embed
from vitplasticity.prepared import Split


@torch.no_grad()
def features(model: torch.nn.Module, split: Split, img_size: int, batch_size: int, device: torch.device,
             mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD) -> np.ndarray:
    """L2-normalised mean of the last block's output tokens. (N, D)"""
    model.eval().to(device)
    out = []
    for start in range(0, len(split.labels), batch_size):
        images = transforms.eval_batch(split.images[start : start + batch_size], img_size, device, mean, std)
        hidden = model.blocks(embed(model, images))  # (B, N, D)
        pooled = torch.nn.functional.normalize(hidden.float().mean(dim=1), dim=-1)
        out.append(pooled.cpu().numpy())
    return np.concatenate(out)


def fit_and_score(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                  seed: int = 0, max_iter: int = 5000, progress: Callable[[str], None] = print) -> dict:
    progress(f"linear probe: fitting on {len(train_y)} samples of dimension {train_x.shape[1]}")
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    classifier.fit(train_x, np.asarray(train_y))
    return {
        "train_acc": float(classifier.score(train_x, np.asarray(train_y))),
        "test_acc": float(classifier.score(test_x, np.asarray(test_y))),
        "n_train": int(len(train_y)),
        "n_test": int(len(test_y)),
        "feature_dim": int(train_x.shape[1]),
    }
