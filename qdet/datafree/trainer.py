"""Zero-shot (data-free) training for any qdet trainer: the student's batches come from a
generator trained against the frozen FP teacher, never from ``DATASETS.TRAIN``."""

from __future__ import annotations

from detectron2.utils import comm

from qdet.datafree.source import GeneratedBatches, GeneratorSource, ZeroShotHook
from qdet.engine.hooks import CalibrationHook


class ZeroShotTrainerMixin:
    """Mixed in before a :class:`qdet.engine.QDetTrainer`: the training loader is the
    generator's (:class:`GeneratedBatches`), calibration and EWGS's Hessian sample it
    without training it, :class:`ZeroShotHook` warms it up first, and the checkpointer saves
    and resumes it (``zeroshot_generator``). Subclasses build the task's
    :class:`GeneratorSource` in :meth:`build_zeroshot_source`. Needs the teacher
    (``DISTILL.ENABLED``) and ``DISTILL.LABEL_FREE``: generated images have no labels."""

    def __init__(self, cfg):
        if not (cfg.DISTILL.ENABLED and cfg.DISTILL.LABEL_FREE):
            raise ValueError(
                "ZEROSHOT.ENABLED needs DISTILL.ENABLED True and DISTILL.LABEL_FREE True: "
                "the student learns from the teacher's outputs on generated images only"
            )
        if comm.get_world_size() > 1:
            raise ValueError("zero-shot training runs in one process (one generator)")
        self._zeroshot: GeneratorSource | None = None
        super().__init__(cfg)
        # build_hooks made the checkpointer: the generator is saved and resumed with the model.
        self.checkpointer.checkpointables["zeroshot_generator"] = self._zeroshot

    def build_zeroshot_source(self, cfg, model) -> GeneratorSource:
        raise NotImplementedError

    def build_model(self, cfg):
        model = super().build_model(cfg)
        self._zeroshot = self.build_zeroshot_source(cfg, model)
        return model

    def build_train_loader(self, cfg):
        return GeneratedBatches(self._zeroshot, train_generator=True)

    def sample_loader(self):
        return GeneratedBatches(self._zeroshot, train_generator=False)

    def build_hooks(self):
        hooks = super().build_hooks()
        calibration = next(h for h in hooks if isinstance(h, CalibrationHook))
        others = [h for h in hooks if h is not calibration]
        warmup = ZeroShotHook(self._zeroshot, self.cfg)
        # The student's quantizers are calibrated on warmed-up images, unless the warm-up
        # itself runs the student (AdaDFQ's terms): it must not meet uncalibrated
        # quantizers, which would initialise themselves from the untrained generator.
        if self.cfg.ZEROSHOT.LOSS == "adadfq":
            return [calibration, warmup, *others]
        return [warmup, calibration, *others]
