"""digits: an MLP on scikit-learn's bundled 8x8 digits (1,797 images, no download).

Data: `sklearn.datasets.load_digits`, pixels / 16; a fixed permutation (seed 0, not the
run's seed) puts 1,437 images in train and 360 in val (80/20). The run's seed picks the
initial weights and the order of the minibatches.

Model: 64 -> 256 -> 256 -> 10, ReLU (85 k parameters, 6 names). Optimizer: SGD with
momentum 0.9 (no Nesterov), weight decay 5e-4 on the weights, batch 64, 4,000 steps
(~180 epochs) with 200 of warmup and cosine to 0.1x of the peak: ~5 s of training on
one thread. SGD rather than Adam because SGD's rate is
scale-sensitive: too low it does not converge in the budget, too high it diverges or
ends noisy, so a fixed schedule at 0.1x or 10x of the best peak loses clearly, which
is what an autotuning controller has to recover; and the table then covers both
optimizer families (chargpt is AdamW).

Validation loss: cross-entropy over all 360 val images (also accuracy).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

BATCH = 64
WIDTH = 256

_DATA: dict[str, torch.Tensor] = {}


def splits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, val x, val y), the same for every run."""
    if not _DATA:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        n_val = 360
        val, train = order[:n_val], order[n_val:]
        _DATA.update(xt=x[train], yt=y[train], xv=x[val], yv=y[val])
    return _DATA["xt"], _DATA["yt"], _DATA["xv"], _DATA["yv"]


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


class DigitsJob:
    """One run: model, SGD with momentum, minibatches in a seeded order (epoch by epoch)."""

    def __init__(self, seed: int, peak_lr: float) -> None:
        self.xt, self.yt, self.xv, self.yv = splits()
        torch.manual_seed(seed)
        self.model = DigitsMLP()
        weights = [p for p in self.model.parameters() if p.dim() >= 2]
        biases = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.SGD(
            [{"params": weights, "weight_decay": 5e-4}, {"params": biases, "weight_decay": 0.0}],
            lr=peak_lr, momentum=0.9)
        self.order = torch.Generator().manual_seed(10_000 + seed)
        self._batches: list[torch.Tensor] = []
        self.accuracy = float("nan")

    def _next_batch(self) -> torch.Tensor:
        if not self._batches:
            perm = torch.randperm(len(self.xt), generator=self.order)
            self._batches = list(perm[: len(perm) // BATCH * BATCH].split(BATCH))[::-1]
        return self._batches.pop()

    def train_step(self) -> torch.Tensor:
        """One optimizer step on the next minibatch; returns the (detached) loss."""
        ix = self._next_batch()
        loss = F.cross_entropy(self.model(self.xt[ix]), self.yt[ix])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Cross-entropy over the whole val split (a diverged run gives inf or nan)."""
        logits = self.model(self.xv)
        self.accuracy = float((logits.argmax(1) == self.yv).float().mean())
        return float(F.cross_entropy(logits, self.yv))
