# The embedded digits data (qdet_digits_train / qdet_digits_val, registered by `import qdet`)
# as LazyConfig dataloaders: the yacs configs' sizes (short edge 160, long edge <= 192),
# no flip (digits are not mirror-symmetric), COCO evaluation.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from qdet.engine import has_compiled_ops

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="qdet_digits_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(160,), max_size=192, sample_style="choice")
        ],
        image_format="RGB",
    ),
    total_batch_size=8,
    num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="qdet_digits_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=160, max_size=192)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=0,
)
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    use_fast_impl=has_compiled_ops(),  # pycocotools' own evaluation without Detectron2's _C
)
