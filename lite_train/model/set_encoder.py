"""Support images (n, 3, S, S) in, a 64-d task embedding (1, 64) out: LITE's DeepSets set encoder
(reference lite.md §1.2; LITE:src/set_encoder.py) -- 5 x [conv3x3 -> BN -> ReLU -> maxpool2], global average
pool, then the mean over the set (no network after pooling).

Its BatchNorm always normalises with the statistics of the batch it is given, in training AND at test
time, as in the reference (which keeps the set encoder in train mode forever). So the embedding of an image
depends on the batch it is encoded in: the test path encodes in chunks of 40, the LITE step encodes the
h gradient images as one batch. The running statistics are kept (checkpoints carry them) but, as in the
reference, never read; unlike the reference they are also not updated (see docs/fidelity.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EMBEDDING_DIM = 64
STAGES = 5


class BatchStatsNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always uses the current batch's statistics and leaves the running ones untouched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps)


def _stage(in_channels: int) -> nn.Sequential:
    # Indices 0..3 are part of the checkpoint names (`layer{i}.0.weight`, `layer{i}.1.running_mean`).
    return nn.Sequential(
        nn.Conv2d(in_channels, EMBEDDING_DIM, kernel_size=3, stride=1, padding=1),
        BatchStatsNorm2d(EMBEDDING_DIM),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2, stride=2),
    )


class SimplePrePoolNet(nn.Module):
    """phi: one embedding per image, (n, 3, S, S) -> (n, 64)."""

    def __init__(self):
        super().__init__()
        self.layer1 = _stage(3)
        self.layer2 = _stage(EMBEDDING_DIM)
        self.layer3 = _stage(EMBEDDING_DIM)
        self.layer4 = _stage(EMBEDDING_DIM)
        self.layer5 = _stage(EMBEDDING_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn, relu, pool in (self.layer1, self.layer2, self.layer3, self.layer4, self.layer5):
            # ReLU after the max-pool rather than before: the two commute exactly (ReLU is monotonic; where a
            # window's maximum is <= 0 both give 0 and a zero gradient), and ReLU then touches a quarter of the
            # values. Spatial size halves (floor) per stage: 224 -> 112 -> 56 -> 28 -> 14 -> 7.
            x = relu(pool(bn(conv(x))))  # (n, 64, H/2, W/2)
        return x.mean(dim=(2, 3))  # (n, 64): global average pool


class SetEncoder(nn.Module):
    """`pre_pool(images)` -> (n, 64) per-image embeddings; `forward(images)` -> (1, 64) their mean."""

    def __init__(self):
        super().__init__()
        self.pre_pooling_fn = SimplePrePoolNet()

    def pre_pool(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] < 1:
            raise ValueError("the set encoder needs at least one image")
        # channels-last: oneDNN's convolutions, BN and max-pool run faster on it (BENCHMARKS.md, "Training")
        return self.pre_pooling_fn(images.contiguous(memory_format=torch.channels_last))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pre_pool(images).mean(dim=0, keepdim=True)  # (1, 64)
