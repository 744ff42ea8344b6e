"""The training loader whose position is part of the checkpoint: a resumed run sees the
batches the uninterrupted run would have seen.

Detectron2's training loader restarts its sampler on resume, so a run killed at iteration
t trains again on the first batches. Here the batches are planned ahead as a pure function
of the seed: Detectron2's :class:`~detectron2.data.samplers.TrainingSampler` stream of
dataset indices (seeded shuffle, every rank its share), grouped into batches as
Detectron2's ``AspectRatioGroupedDataset`` groups them (images wider than tall apart from
the others, read from the dataset's ``width`` / ``height``), each sample tagged with its
position in the rank's stream. :class:`PlannedBatches` skips the first ``start`` batches
without loading an image; :class:`PositionedDataset` maps each sample with NumPy's and
Python's generators seeded by (seed, rank, 0, position), the key Detectron2's one-process
loader gave the same sample before (so runs with ``DATALOADER.NUM_WORKERS 0`` see the
batches they saw before). The batches depend on neither the worker count nor a restart.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm


class PlannedBatches(torch.utils.data.Sampler):
    """This rank's batches, each a list of ``(position, dataset index)``: the seeded
    TrainingSampler stream, grouped by aspect ratio when ``grouping`` (else in stream
    order), from batch ``start`` on. Infinite, as Detectron2's training loader is."""

    def __init__(
        self, sizes: Sequence[tuple[int, int]], batch_size: int, seed: int, grouping: bool
    ):
        self.sizes, self.batch_size, self.seed, self.grouping = sizes, batch_size, seed, grouping
        self.start = 0  # batches to skip: the iteration a resumed run starts at

    def _bucket(self, index: int) -> int:
        width, height = self.sizes[index]
        return 0 if (not self.grouping or width > height) else 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        buckets: list[list[tuple[int, int]]] = [[], []]
        stream = TrainingSampler(len(self.sizes), shuffle=True, seed=self.seed)
        made = 0
        for position, index in enumerate(stream):
            bucket = buckets[self._bucket(index)]
            bucket.append((position, index))
            if len(bucket) == self.batch_size:
                batch = bucket[:]
                del bucket[:]
                if made >= self.start:
                    yield batch
                made += 1


class PositionedDataset(torch.utils.data.Dataset):
    """``mapper(dataset[index])`` for a ``(position, index)``, with NumPy's and Python's
    global generators (which Detectron2's augmentations draw from) seeded by
    (``seed``, rank, 0, position) and put back afterwards: a sample's augmentation is fixed
    by its place in the stream."""

    def __init__(self, dataset: Sequence[dict], mapper: Callable, seed: int):
        self.dataset, self.mapper, self.seed = dataset, mapper, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        position, index = item
        key = [self.seed, comm.get_rank(), 0, position]
        np_state, py_state = np.random.get_state(), random.getstate()
        np.random.seed(key)
        random.seed("-".join(map(str, key)))
        try:
            mapped = self.mapper(self.dataset[index])
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        if mapped is None:
            raise ValueError(
                f"the training mapper returned None for dataset item {index}: a planned "
                "batch cannot replace it with another image"
            )
        return mapped


def resumable_train_loader(
    dataset: Sequence[dict],
    mapper: Callable,
    seed: int,
    images_per_batch: int,
    grouping: bool,
    num_workers: int,
) -> torch.utils.data.DataLoader:
    """The training loader of :class:`PlannedBatches` over :class:`PositionedDataset`:
    ``images_per_batch`` images a step over all ranks; set
    ``loader.batch_sampler.start`` to the first iteration before iterating it."""
    world = comm.get_world_size()
    if images_per_batch % world:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={images_per_batch} is not divisible by the {world} "
            "processes: each takes an equal share"
        )
    sizes = [(d["width"], d["height"]) for d in dataset]
    return torch.utils.data.DataLoader(
        PositionedDataset(dataset, mapper, seed),
        batch_sampler=PlannedBatches(sizes, images_per_batch // world, seed, grouping),
        collate_fn=trivial_batch_collator,
        num_workers=num_workers,
        worker_init_fn=worker_init_reset_seed,
    )
