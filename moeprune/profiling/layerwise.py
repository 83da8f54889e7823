"""Run demos through a decoder model one layer at a time (GPTQ's sequential pass, the out-of-core profiler).

:meth:`LayerReplay.run` sends every demo through decoder layer ``l`` only: layer 0's place is taken by
the cached inputs of layer ``l`` (the outputs of the previous call), the layers in between pass them
on untouched, and a hook stops the forward right after layer ``l``, whose outputs become the cache
for the next call. One forward per demo and layer; the model's other layers never run.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


class _Stop(Exception):
    pass


class LayerReplay:
    """Layer-by-layer forwards of ``demos`` (token-id lists) through ``model`` on ``device``."""

    def __init__(self, model: Any, demos: Sequence[Sequence[int]], device: Any):
        self.model, self.demos, self.device = model, demos, device
        self.layers = model.model.layers
        self.cached: list[Any] = [None] * len(demos)  # per demo: the output of the last layer run

    def run(self, l: int) -> None:
        """Every demo through layer ``l`` (its inputs: :attr:`cached`); :attr:`cached` becomes its outputs."""
        current = {"demo": 0}
        for i in range(l):
            self.layers[i].forward = (lambda *a, **k: self.cached[current["demo"]]) if i == 0 else \
                (lambda *a, **k: a[0] if a else k["hidden_states"])

        def stop(module, args, kwargs, output):
            self.cached[current["demo"]] = output.detach() if isinstance(output, torch.Tensor) else output
            raise _Stop

        handle = self.layers[l].register_forward_hook(stop, with_kwargs=True)
        try:
            for d, ids in enumerate(self.demos):
                current["demo"] = d
                try:
                    self.model(torch.tensor([list(ids)], device=self.device), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
            for i in range(l):
                del self.layers[i].forward
