"""EWGS's gradient-scaling factor delta from the Hessian trace (Lee, Kim, Ham 2021, Eq. 9),
as its official code computes it (cvlab-yonsei/EWGS, ``utils.py``: ``update_grad_scales``
and ``trace``).

For every EWGS quantizer and each of a few training batches, with the model in train mode:

    delta_batch = (Tr(H) / N) / (3 std(g)),        delta = clip(mean over batches, 0, inf)

v is the discretiser's output v_tilde in [0, 1] (for weights, before the map
2 (v_tilde - 0.5)), N = numel(v), g = dL/dv, H = d^2 L / dv^2, std the sample std. Tr(H)
is Hutchinson's estimate, the mean of z^T H z over Rademacher vectors z, drawn until the
mean changes by less than ``tol`` (1e-3) relative to the previous mean, at most
``max_iter`` (50) times; EWGS's stopping rule divides by the signed previous mean, and so
does this one. The gradients of all quantizers come from one backward before any trace is
taken (EWGS collects its list first: a Hessian-vector product for one layer would
otherwise overwrite the retained gradients of the others).

qdet's quantizers return out = A v_tilde + B (A = 2s for weights, alpha for activations),
linear in v_tilde, so from g_out = dL/d out:

    g = A g_out,    z^T H z = <A z, d<g_out, A z> / d out>

exact in EWGS's units, per tensor or per channel, without exposing v_tilde. A quantizer
called several times in one forward (RetinaNet's shared head, once per FPN level) is one
tensor for weights (the same W each call: gradients and Hessian-vector products add up
over calls) and the concatenation of its inputs for activations.

Two estimators of the same traces (``estimator``): ``per_layer`` is EWGS's code, one
Hutchinson loop per quantizer, so about (quantizers x samples) Hessian-vector products,
each nearly a backward pass; ``joint`` draws one vector over all quantizers at once, so
one product serves every quantizer (see :func:`_joint_traces`).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterable
from itertools import islice

import numpy as np
import torch
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.utils import comm
from detectron2.utils.events import EventStorage, get_event_storage
from torch import nn

from qdet.quantization.functional import _output_map
from qdet.quantization.quantizers import EWGSQuantizer
from qdet.quantization.second_order import twice_differentiable

logger = logging.getLogger(__name__)


class RunningTrace:
    """Hutchinson samples z^T H z of one tensor under EWGS's stopping rule (module
    docstring): ``add(sample)`` returns True once the estimate has settled."""

    def __init__(self, tol: float | None = 1e-3):
        self.tol = tol
        self.samples: list[float] = []
        self._previous = 0.0

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples)

    def add(self, sample: float) -> bool:
        self.samples.append(sample)
        mean, previous = self.mean, self._previous
        self._previous = mean
        return self.tol is not None and abs(mean - previous) / (previous + 1e-6) < self.tol


def hutchinson_trace(
    sample: Callable[[], float], max_iter: int = 50, tol: float | None = 1e-3
) -> float:
    """Mean of ``sample()`` (one z^T H z each), stopped by EWGS's rule; ``tol=None`` always
    draws ``max_iter`` samples."""
    trace = RunningTrace(tol)
    for _ in range(max_iter):
        if trace.add(sample()):
            break
    return trace.mean


def _rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    z = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return z.to(like.dtype) * 2 - 1


class _TraceProblem:
    """One quantizer's Hessian trace on one batch, in EWGS's [0, 1] units: its outputs in
    this forward, g = A g_out for each tensor v, N and std(g)."""

    def __init__(self, q: EWGSQuantizer, outputs: list, out_grads: list):
        self.outputs = outputs
        lower, _, scale, mode = q._affine()
        amp = _output_map(mode, lower, scale)[0].detach()
        self.amps = [q._view(amp, out) for out in outputs]
        out_grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outputs, out_grads)]
        calls = range(len(outputs))
        self.parts = [list(calls)] if q.kind == "weight" else [[k] for k in calls]
        self.grads = [sum(self.amps[k] * out_grads[k] for k in part) for part in self.parts]
        self.numel = sum(g.numel() for g in self.grads)
        self.std = torch.cat([g.detach().flatten() for g in self.grads]).std().item()

    def draw(self, generator: torch.Generator) -> list[torch.Tensor]:
        return [_rademacher(g, generator) for g in self.grads]

    def g_dot_z(self, zs: list[torch.Tensor]) -> torch.Tensor:
        return sum((g * z).sum() for g, z in zip(self.grads, zs))

    def z_hz(self, zs: list[torch.Tensor], hz: list[torch.Tensor | None]) -> float:
        """z^T H z, from hz = d<g, z>/d out of each output (times A, that is H z)."""
        total = 0.0
        for part, z in zip(self.parts, zs):
            h = [self.amps[k] * hz[k] for k in part if hz[k] is not None]
            if h:
                total += (z * sum(h)).sum().item()
        return total

    def delta(self, trace: float) -> float:
        return (trace / self.numel) / (3 * self.std)


def _hessian_products(value: torch.Tensor, outputs: list) -> list:
    if not value.requires_grad:  # the loss is linear in these v's: H = 0
        return [None] * len(outputs)
    return list(torch.autograd.grad(value, outputs, retain_graph=True, allow_unused=True))


def _per_layer_traces(problems, generator, max_iter, tol) -> list[float]:
    """EWGS's code: one Hutchinson loop per quantizer, one product per sample."""
    traces = []
    for p in problems:

        def sample(p=p):
            zs = p.draw(generator)
            return p.z_hz(zs, _hessian_products(p.g_dot_z(zs), p.outputs))

        traces.append(hutchinson_trace(sample, max_iter, tol))
    return traces


def _joint_traces(problems, generator, max_iter, tol) -> list[float]:
    """One Rademacher vector over every quantizer's v at once, so one product gives a
    sample for all: z_i^T (H z)_i = z_i^T H_ii z_i + sum_{j != i} z_i^T H_ij z_j. The cross
    terms have mean 0 (independent z_i, z_j): each estimate is still unbiased, with more
    variance. Every quantizer gets all ``max_iter`` samples (``tol`` is not used): EWGS's
    stopping rule, made for one layer's samples, would stop noisy ones by chance, and the
    loop runs until the slowest quantizer settles anyway."""
    traces = [RunningTrace(tol=None) for _ in problems]
    outputs = [o for p in problems for o in p.outputs]
    for _ in range(max_iter):
        zs = [p.draw(generator) for p in problems]
        hz = iter(_hessian_products(sum(p.g_dot_z(z) for p, z in zip(problems, zs)), outputs))
        for p, z, trace in zip(problems, zs, traces):
            trace.add(p.z_hz(z, [next(hz) for _ in p.outputs]))
    return [t.mean for t in traces]


ESTIMATORS = {"per_layer": _per_layer_traces, "joint": _joint_traces}


@contextlib.contextmanager
def preserved_rng():
    """Python's, NumPy's and torch's random states are as before when the block ends, so
    a delta refresh (and the batches it loads) leaves the training run's randomness alone."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def _side_effects_undone(model: nn.Module):
    """Train mode inside; afterwards the model's buffers (BN statistics), plain numeric
    attributes (e.g. RetinaNet's loss-normaliser EMA) and modes are as before, and nothing
    reached the caller's event storage. Synchronised BN runs locally inside: each process
    estimates on its own batches, with no collectives in the Hessian-vector products.
    ROIAlign gets its exact second derivative (:mod:`qdet.quantization.second_order`)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    numbers = [
        (m, {k: v for k, v in vars(m).items() if type(v) in (int, float, bool)})
        for m in model.modules()
    ]
    local_bn = [m for m in model.modules() if isinstance(m, (nn.SyncBatchNorm, NaiveSyncBatchNorm))]
    for m in local_bn:
        m.forward = nn.BatchNorm2d.forward.__get__(m)
    try:
        current_iter = get_event_storage().iter
    except AssertionError:  # no storage: not inside a trainer
        current_iter = 0
    model.train()
    try:
        with EventStorage(current_iter), torch.enable_grad(), twice_differentiable(model):
            yield
    finally:
        for m in local_bn:
            del m.forward
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, attrs in numbers:
            for k, v in attrs.items():
                setattr(m, k, v)


def update_ewgs_deltas(
    model: nn.Module,
    loss_fn: Callable[[object], torch.Tensor],
    batches: Iterable,
    num_batches: int = 3,
    estimator: str = "per_layer",
    max_iter: int = 50,
    tol: float | None = 1e-3,
    seed: int = 0,
    average_across_ranks: bool = True,
) -> dict[str, float]:
    """Re-estimate ``delta`` of every enabled :class:`EWGSQuantizer` in ``model`` (EWGS
    Eq. 9, as its code does; see the module docstring) and set it. Returns name -> delta.

    ``loss_fn(batch)`` runs ``model`` on a batch and returns the scalar training loss.
    ``batches`` is read for ``num_batches`` batches (an iterator is left just past them).
    ``estimator``: ``per_layer`` (EWGS's code) or ``joint`` (one product for all). The
    Rademacher vectors come from a generator seeded with ``seed``. With several processes
    (and ``average_across_ranks``) each estimates on its own batches and all end with the
    mean over all batches. Nothing else changes: parameters' ``.grad`` and
    ``requires_grad``, buffers, modes and every random state are as before.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"unknown EWGS trace estimator {estimator!r}: use one of {list(ESTIMATORS)}"
        )
    quantizers = {
        n: m for n, m in model.named_modules() if isinstance(m, EWGSQuantizer) and m.enabled
    }
    if not quantizers:
        return {}
    uncalibrated = [n for n, q in quantizers.items() if not q.initialized]
    if uncalibrated:
        raise RuntimeError(
            f"update_ewgs_deltas: {len(uncalibrated)} quantizers are not calibrated yet "
            f"(e.g. {uncalibrated[0]}); run qdet.quantization.calibrate(model, ...) first"
        )
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in quantizers}

    def keep(name):
        def hook(_module, _inputs, out):
            if out.requires_grad:
                outputs[name].append(out)

        return hook

    handles = [q.register_forward_hook(keep(n)) for n, q in quantizers.items()]
    sums = [0.0] * len(quantizers)
    counts = [0] * len(quantizers)
    generators: dict[torch.device, torch.Generator] = {}
    seen = 0
    try:
        with preserved_rng(), _side_effects_undone(model):
            for batch in islice(iter(batches), num_batches):
                loss = loss_fn(batch)
                kept = [o for outs in outputs.values() for o in outs]
                if not kept or not loss.requires_grad:
                    raise RuntimeError(
                        "update_ewgs_deltas: the loss does not depend on any EWGS quantizer "
                        "output; loss_fn must run the model on the batch and return its loss"
                    )
                # Every quantizer's gradient first, in one backward (as EWGS).
                grads = iter(torch.autograd.grad(loss, kept, create_graph=True, allow_unused=True))
                problems = {}
                for i, (name, outs) in enumerate(outputs.items()):
                    out_grads = [next(grads) for _ in outs]
                    if outs:
                        p = _TraceProblem(quantizers[name], outs, out_grads)
                        if p.std > 0:  # std 0: no gradient reached it in this batch
                            problems[i] = p
                if problems:
                    device = kept[0].device
                    if device not in generators:
                        generators[device] = torch.Generator(device).manual_seed(seed)
                    traces = ESTIMATORS[estimator](
                        list(problems.values()), generators[device], max_iter, tol
                    )
                    for (i, p), trace in zip(problems.items(), traces):
                        sums[i] += p.delta(trace)
                        counts[i] += 1
                for outs in outputs.values():
                    outs.clear()
                del loss, kept, grads, problems
                seen += 1
    finally:
        for h in handles:
            h.remove()
        for outs in outputs.values():
            outs.clear()
    if seen == 0:
        raise ValueError("update_ewgs_deltas got no batches: the data iterable is empty")
    if average_across_ranks and comm.get_world_size() > 1:
        gathered = comm.all_gather((sums, counts))
        sums = [sum(s[i] for s, _ in gathered) for i in range(len(sums))]
        counts = [sum(c[i] for _, c in gathered) for i in range(len(counts))]
    deltas, untouched = {}, []
    for (name, q), total, count in zip(quantizers.items(), sums, counts):
        if count == 0:
            untouched.append(name)
            continue
        deltas[name] = max(total / count, 0.0)
        q.delta.fill_(deltas[name])
    if untouched:
        logger.warning(
            "EWGS delta kept for %d quantizers that got no gradient (e.g. %s)",
            len(untouched),
            untouched[0],
        )
    # |v_hat - v_tilde| <= 1 / (2n): beyond delta = 2n the factor 1 + delta sign(g) (...)
    # can change gradient signs.
    flipping = [n for n, d in deltas.items() if d > 2 * quantizers[n].n_levels]
    if flipping:
        logger.warning(
            "EWGS delta > 2 (2^b - 1) for %d quantizers (e.g. %s = %.3g): the scaling can flip "
            "gradient signs there. EWGS fine-tunes a trained FP model, where deltas are small "
            "(0.01-0.6 on qdet's digits RetinaNet); check MODEL.WEIGHTS",
            len(flipping),
            flipping[0],
            deltas[flipping[0]],
        )
    return deltas
