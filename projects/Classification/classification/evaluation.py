"""Top-1 / top-5 accuracy as a Detectron2 ``DatasetEvaluator`` (summed over processes)."""

from __future__ import annotations

import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm


class ClassificationEvaluator(DatasetEvaluator):
    """``{"classification": {"top1": %, "top5": %}}`` over every image seen."""

    def reset(self) -> None:
        self.counts = torch.zeros(3, dtype=torch.long)  # images, top-1 hits, top-5 hits

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        labels = torch.tensor([x["label"] for x in inputs])
        logits = torch.stack([o["logits"].cpu() for o in outputs])
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        self.counts += torch.tensor([len(labels), hits[:, 0].sum(), hits.any(1).sum()])

    def evaluate(self) -> dict:
        total = sum(comm.all_gather(self.counts))
        if not comm.is_main_process():
            return {}
        n = max(int(total[0]), 1)
        return {
            "classification": {"top1": 100 * int(total[1]) / n, "top5": 100 * int(total[2]) / n}
        }
