"""Detectron2's step loop, resumable bit for bit: a run killed at any iteration and resumed
from its last checkpoint computes what the uninterrupted run computed.

Detectron2's checkpoint holds the weights, the optimizer, the scheduler and the iteration.
A resumed step needs three things more: the training loader at the resumed iteration
(:class:`qdet.engine.resumable_loader.PlannedBatches`), torch's random generator (drop-path,
generated noise) and the model's state kept outside its state dict
(:data:`MODEL_EMA_ATTRIBUTES`). TorchScript's optimising executor must also be off: it runs a
scripted function (Detectron2's ``sigmoid_focal_loss_jit``) as profiled first and fused
afterwards, whose gradients differ in the last bits, so a resumed run's first steps would
differ from the uninterrupted run's. It is off for the whole of training, hooks included:
a call made with it on (a data-free run's generator warm-up, before the first step) changes
what later calls with it off compute.
"""

from __future__ import annotations

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

from qdet.engine.hooks import unwrap_model
from qdet.engine.resumable_loader import PlannedBatches

# Model state Detectron2 keeps outside the state dict: dense detectors' (RetinaNet's,
# FCOS's) EMA of the foreground-anchor count that normalises their losses. Kept for every
# module that has one: a data-free run's teacher computes its RetinaNet loss on the
# generator's layouts, and so moves its own.
MODEL_EMA_ATTRIBUTES = ("loss_normalizer",)


def _ema_values(model: torch.nn.Module) -> dict[str, float]:
    """``{"<module name>.<attribute>": value}`` of every :data:`MODEL_EMA_ATTRIBUTES` the
    modules of ``model`` hold (Detectron2 sets one at its first update)."""
    return {
        ".".join(filter(None, (prefix, attribute))): float(getattr(module, attribute))
        for prefix, module in model.named_modules()
        for attribute in MODEL_EMA_ATTRIBUTES
        if hasattr(module, attribute)
    }


def jit_unoptimized():
    """A context in which TorchScript functions run unoptimised: every call computes the
    same, whatever ran before it in the process (see the module's docstring)."""
    return torch.jit.optimized_execution(False)


class ExactResumeMixin:
    """Mixed in before Detectron2's :class:`SimpleTrainer` (or a subclass): training (its
    hooks too) with TorchScript's optimising executor off (:func:`jit_unoptimized`); the
    state dict adds torch's generator and the
    model's EMA attributes; :meth:`start_loader_at` moves the loader to the resumed
    iteration once the checkpoint is loaded."""

    _resumed_rng: torch.Tensor | None = None

    def train(self, start_iter: int, max_iter: int) -> None:
        with jit_unoptimized():
            super().train(start_iter, max_iter)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["torch_rng"] = torch.get_rng_state()
        state["model_ema"] = _ema_values(unwrap_model(self.model))
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        # Put back by start_loader_at, once the loader's iterator is made.
        self._resumed_rng = state.get("torch_rng")
        model = unwrap_model(self.model)
        for name, value in state.get("model_ema", {}).items():
            prefix, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(prefix), attribute, value)

    def start_loader_at(self, start_iter: int) -> None:
        """The training loader's first batch becomes the one the uninterrupted run trained
        on at ``start_iter``. Its iterator is made here, before torch's generator is put
        back to the checkpoint's state: making it draws one number, which the uninterrupted
        run drew before its first step."""
        sampler = getattr(self.data_loader, "batch_sampler", None)
        if isinstance(sampler, PlannedBatches):
            sampler.start = start_iter
        if self._resumed_rng is not None:
            self._data_loader_iter  # noqa: B018  (made now: see above)
            torch.set_rng_state(self._resumed_rng)
            self._resumed_rng = None


class ResumableSimpleTrainer(ExactResumeMixin, SimpleTrainer):
    """Detectron2's :class:`SimpleTrainer`, resumable bit for bit."""


class ResumableAMPTrainer(ExactResumeMixin, AMPTrainer):
    """Detectron2's :class:`AMPTrainer` (CUDA), resumable bit for bit."""
