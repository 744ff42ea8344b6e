"""A quantizer's flags in its checkpoint (mixed into
:class:`qdet.quantization.quantizers.Quantizer`).

Flags that are not tensors travel in the state dict as extra state, so a checkpoint
restores whether the quantizer was calibrated and which output map it chose. Encoded as a
small int tensor: Detectron2's (fvcore's) checkpointer accepts tensors only.
"""

from __future__ import annotations

import torch

from qdet.quantization.targets import DEPLOY_TARGETS

# Extra-state codes of the deployment target a quantizer trained for (0: none).
_TARGET_CODES = {None: 0, **{name: i + 1 for i, name in enumerate(DEPLOY_TARGETS)}}


class CheckpointState:
    """Extra state ``[initialized, signed (-1 = undecided), bits]``, then the deployment
    target's code for a quantizer trained for one; per-channel parameters sized from the
    checkpoint. Reads the quantizer's ``initialized``, ``signed``, ``bits`` and ``target``."""

    _SIGN_CODES = {None: -1, False: 0, True: 1}

    def get_extra_state(self) -> torch.Tensor:
        state = [int(self.initialized), self._SIGN_CODES[self.signed], self.bits]
        if self.target is not None:  # checkpoints of simulated models keep their 3 entries
            state.append(_TARGET_CODES[self.target.name])
        return torch.tensor(state)

    def set_extra_state(self, state) -> None:
        values = [int(v) for v in torch.as_tensor(state).tolist()]
        initialized, sign, bits = values[:3]
        if bits != self.bits:
            raise ValueError(
                f"checkpoint quantizer has {bits} bits, this model {self.bits}: "
                "build the model with the bit widths the checkpoint was trained with"
            )
        names = {code: name for name, code in _TARGET_CODES.items()}
        trained_for = names.get(values[3] if len(values) > 3 else 0)
        mine = self.target.name if self.target else None
        if trained_for is not None and trained_for != mine:
            raise ValueError(
                f"checkpoint quantizer was trained for QUANT.TARGET {trained_for!r}, this "
                f"model is built for {mine or ''!r}: set QUANT.TARGET {trained_for!r}"
            )
        self.initialized = bool(initialized)
        self.signed = {-1: None, 0: False, 1: True}[sign]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Per-channel parameters are created lazily; take their size from the checkpoint.
        for name, param in self._parameters.items():
            key = prefix + name
            if key in state_dict and state_dict[key].shape != param.shape:
                param.data = torch.empty_like(state_dict[key], device=param.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _resize(self, shape: tuple[int, ...]) -> None:
        for p in self._parameters.values():
            if p.shape != shape:
                p.data = torch.zeros(shape, dtype=p.dtype, device=p.device)
