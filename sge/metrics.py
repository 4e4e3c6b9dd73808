"""Top-k accuracy as exact integer counts, aggregated by summing counts (never averages).

Averaging per-process percentages is wrong when processes see different numbers of images
(the val set is sharded without padding); summing correct-counts and image counts is exact.
Counts stay on the device during the loop (no host sync per batch).
"""
from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k (a tensor)."""
    maxk = min(max(ks), logits.shape[1])
    hits = logits.topk(maxk, dim=1).indices.eq(labels.view(-1, 1))
    return torch.stack([hits[:, :min(k, maxk)].any(dim=1).sum() for k in ks])


class EvalCounts:
    """Running sums for one evaluation: correct top-1, correct top-5, images, loss sum.

    float64 holds integer counts exactly up to 2**53, far beyond any dataset.
    """

    def __init__(self, device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> None:
        correct = topk_correct(logits, labels).to(torch.float64)
        self.sums[:2] += correct
        self.sums[2] += labels.shape[0]
        self.sums[3] += loss_sum.detach().to(torch.float64)

    def summary(self) -> dict:
        """Percentages, mean loss and exact counts from (already all-reduced) sums."""
        correct1, correct5, images, loss_sum = self.sums.tolist()
        n = max(1.0, images)
        return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n,
                "images": int(images), "correct1": int(correct1), "correct5": int(correct5)}
