"""One-token decoding steps replayed from a CUDA graph: the whole model's kernels launched at once.

Eager decoding of a small model is bound by Python and kernel launches (hundreds of small kernels
per token). A graph needs static shapes and addresses, so the decoding state is allocated once per
(batch, cache length) and positions live on the device (`KVCache.pos` / `RecurrentState.pos` as
0-dim tensors): attention writes its key at `pos` and attends over the whole cache with the
positions not yet written masked out; recurrent states are updated in place as always.

`decode` (`models/generate.py`) uses this on CUDA; `StaticDecoder.step` returns the graph's own
output buffer, overwritten by the next step.
"""

from collections import OrderedDict
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

from slmlab.ops import autocast_dtype

if TYPE_CHECKING:
    from slmlab.models.transformer import CausalLM

CACHE_BLOCK = 256  # cache lengths are rounded up to this, so prompts of similar length share a graph
DECODERS_PER_MODEL = 4


class StaticDecoder:
    """A decoding state with device-side positions, and the next-token step captured as a CUDA graph
    on first use (`graph=True`); without a graph the same static step runs eagerly (CPU tests)."""

    def __init__(self, model: "CausalLM", batch: int, max_len: int, graph: bool) -> None:
        p = model.lm_head.weight
        self.state = model.init_state(batch, max_len)
        for s in self.state:
            if hasattr(s, "pos"):
                s.pos = torch.zeros((), dtype=torch.long, device=p.device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.graph = torch.cuda.CUDAGraph() if graph else None
        self.logits: Tensor | None = None  # the graph's output buffer
        self.captured = False

    def prefill(self, model: "CausalLM", prompt: Tensor) -> Tensor:
        """Resets the state and runs the prompt (batch, prompt_len) eagerly: last position's logits."""
        self._reset()
        buffers = [(s, s.pos) for s in self.state if hasattr(s, "pos")]
        for s, _ in buffers:  # the prompt takes the ordinary path (flash / FlexAttention) into the same buffers
            s.pos = 0
        logits = model.next_token_logits(prompt, self.state)
        for s, buffer in buffers:
            s.pos = buffer.fill_(prompt.shape[1])
        return logits

    def step(self, model: "CausalLM", token: Tensor) -> Tensor:
        """token: (batch,) -> next-token logits (batch, vocab)."""
        self.token.copy_(token[:, None])
        if self.graph is None:
            return model.next_token_logits(self.token, self.state)
        if not self.captured:
            self._capture(model)
        self.graph.replay()
        return self.logits

    def _capture(self, model: "CausalLM") -> None:
        # capturing runs the step (advancing the state); warm-up first, so kernels are compiled and
        # autotuned and the allocator has its workspaces, then put the state back
        saved = [{k: v.clone() for k, v in vars(s).items() if isinstance(v, Tensor)} for s in self.state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model.next_token_logits(self.token, self.state)
                self._restore(saved)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # loader threads may use CUDA
            self.logits = model.next_token_logits(self.token, self.state)
        self._restore(saved)
        self.captured = True

    def _restore(self, saved: list[dict[str, Tensor]]) -> None:
        for s, tensors in zip(self.state, saved):
            for name, value in tensors.items():
                getattr(s, name).copy_(value)

    def _reset(self) -> None:
        for s in self.state:
            for value in vars(s).values():
                if isinstance(value, Tensor):
                    value.zero_()  # stale keys beyond pos are masked; recurrent states must start at 0


_decoders: "WeakKeyDictionary[CausalLM, OrderedDict]" = WeakKeyDictionary()


def static_decoder(model: "CausalLM", batch: int, max_len: int, graph: bool) -> StaticDecoder:
    """The model's decoder for this batch and (rounded-up) cache length, kept for reuse: GRPO samples
    the same shapes every step. The few most recent are kept per model, keyed also by the weights'
    dtype and autocast, which a captured graph bakes in."""
    max_len = min(model.cfg.max_seq_len, -(-max_len // CACHE_BLOCK) * CACHE_BLOCK)
    weight = model.lm_head.weight
    key = (batch, max_len, weight.device, weight.dtype, autocast_dtype(weight.device), graph)
    cache = _decoders.setdefault(model, OrderedDict())  # decoders hold no reference to the model
    if key not in cache:
        cache[key] = StaticDecoder(model, batch, max_len, graph)
        while len(cache) > DECODERS_PER_MODEL:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def release_decoders(model: "CausalLM") -> None:
    """Frees the model's kept decoders: their states and CUDA graph memory (after rollouts, between benchmarks)."""
    _decoders.pop(model, None)
