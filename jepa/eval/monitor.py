"""Online k-NN monitor: how good the target encoder's features are, while pretraining runs.

The labelled subsets are decoded once (evaluation views, no randomness) and kept in memory; each
evaluation only encodes them with the current target encoder. It draws no random numbers and does
not touch the networks' settings, so a run with the monitor trains exactly like one without.
"""

from __future__ import annotations

import random

import torch

from ..data.shards import Reader, build_index, parse_label
from ..errors import JepaError, SampleError


def decode_subset(spec: str, source, max_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = build_index(spec).spread(max_samples)
    reader, xs, ys = Reader(), [], []
    for record in index.records:
        try:
            raw = reader.sample(record)
            xs.append(source.decode(raw, random.Random(0), train=False))
            ys.append(parse_label(raw, record))
        except (SampleError, OSError):
            continue
    if not xs or min(ys) < 0:
        raise JepaError(f"monitor: '{spec}' needs decodable, labelled samples")
    return torch.stack(xs), torch.tensor(ys)


class KnnMonitor:
    def __init__(self, cfg, source, device: torch.device, bf16: bool):
        self.cfg, self.device, self.bf16 = cfg, device, bf16
        self.train_x, self.train_y = decode_subset(cfg.train, source, cfg.max_train)
        self.test_x, self.test_y = decode_subset(cfg.test, source, cfg.max_test)
        known = torch.isin(self.test_y, self.train_y)  # classify only classes the memory bank holds
        self.test_x, self.test_y = self.test_x[known], self.test_y[known]
        if not len(self.test_y):
            raise JepaError("monitor: the test subset shares no label with the train subset")

    @torch.no_grad()
    def _pooled(self, encoder, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(x), batch):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out.append(encoder(x[i:i + batch].to(self.device)).float().mean(dim=1).cpu())
        return torch.cat(out)

    def __call__(self, encoder) -> dict[str, float]:
        from .probes import effective_rank, knn_probe

        was_training = encoder.training
        encoder.eval()
        try:
            train, test = self._pooled(encoder, self.train_x), self._pooled(encoder, self.test_x)
        finally:
            encoder.train(was_training)
        res = knn_probe(train, self.train_y, test, self.test_y, k=self.cfg.k)
        return {"knn_top1": res.top1, "knn_top5": res.top5, "feature_rank": effective_rank(train)}
