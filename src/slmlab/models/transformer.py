"""The decoder-only backbone: embedding -> N x (pre-norm mixer, pre-norm SwiGLU) -> norm -> LM head."""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from slmlab import mixers  # a module reference: mixers import models.config, so no names yet
from slmlab.models.config import ModelConfig
from slmlab.models.generate import generate
from slmlab.models.layers import RMSNorm, SwiGLU
from slmlab.ops import autocast_dtype
from slmlab.training.losses import chunked_lm_loss, chunked_token_logprobs


RESIDUAL_OUTPUTS = ("mixer.o", "mixer.out_proj", "mlp.down")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs
BACKBONE = "backbone"  # `compile_blocks`: the stack of blocks as one graph


@contextmanager
def _weights_left_for_reset_parameters() -> Iterator[None]:
    """Builds nn.Linear and nn.Embedding without drawing their own initial weights (kaiming-uniform,
    normal): `CausalLM.reset_parameters` draws every one of them again right after. Drawing them twice
    took 19 s of helix_hybrid's 20 s build on a 2-core CPU. Linear biases keep their default init."""
    linear, embedding = nn.Linear.reset_parameters, nn.Embedding.reset_parameters

    def linear_bias_only(self: nn.Linear) -> None:
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features else 0
            nn.init.uniform_(self.bias, -bound, bound)

    nn.Linear.reset_parameters, nn.Embedding.reset_parameters = linear_bias_only, lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = linear, embedding


def make_norm(cfg: ModelConfig, dim: int) -> RMSNorm:
    return RMSNorm(dim, cfg.norm_eps, zero_centred=cfg.norm == "zc_rms")


class Block(nn.Module):
    """
    x ──┬─ norm ─ mixer ─(×σ(g))─(+)──┬─ norm ─ SwiGLU ─(×σ(g))─(+)── out
        └───────────────────────────┘  └──────────────────────────┘
    The σ(g) scalar gates exist only with `residual: gated` (OdinNext); they start at σ(0) = 0.5.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.mixer_norm = make_norm(cfg, cfg.d_model)
        self.mixer = mixers.mixer_class(cfg.layer_mixers[layer_idx])(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg, cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden, cfg.mlp_kernel_in_use())
        gated = cfg.residual == "gated"
        self.mixer_gate = nn.Parameter(torch.zeros(())) if gated else None
        self.mlp_gate = nn.Parameter(torch.zeros(())) if gated else None

    def forward(self, x: Tensor, state: object | None = None, positions: Tensor | None = None) -> Tensor:
        x = x + _gate(self.mixer(self.mixer_norm(x), state, positions), self.mixer_gate)
        return x + _gate(self.mlp(self.mlp_norm(x)), self.mlp_gate)


def _gate(branch: Tensor, gate: Tensor | None) -> Tensor:
    return branch if gate is None else torch.sigmoid(gate).to(branch.dtype) * branch


def to_residual_stream(x: Tensor) -> Tensor:
    """The embeddings in the residual stream's dtype: bf16 under bf16 autocast, as with bf16 parameters
    (torchtitan, Megatron): half the memory traffic of every norm and residual add; norms still compute
    in float32. fp16 keeps a float32 stream: its range would overflow."""
    return x.to(torch.bfloat16) if autocast_dtype(x.device) == torch.bfloat16 else x


def run_blocks(blocks: nn.ModuleList, x: Tensor, positions: Tensor | None, checkpointing: bool) -> Tensor:
    """The stack of blocks without a decoding state (training, evaluation); `checkpointing` recomputes each
    block's activations in the backward."""
    for block in blocks:
        x = checkpoint(block, x, None, positions, use_reentrant=False) if checkpointing else block(x, None, positions)
    return x


def frozen_weights(linear: nn.Linear) -> int:
    """The number of weights of a linear layer that do not train (its base weight under LoRA)."""
    weight = linear.parametrizations.weight.original if parametrize.is_parametrized(linear, "weight") else linear.weight
    return 0 if weight.requires_grad else weight.numel()


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        with _weights_left_for_reset_parameters():
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
            self.norm = make_norm(cfg, cfg.d_model)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._compiled_stack = None  # `compile_blocks("backbone")`
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every linear and embedding weight; the projections that write into
        the residual stream are scaled by 1/sqrt(2 n_layers) so its variance does not grow with depth
        (GPT-2). Everything else keeps the initialisation its module gave it (norms, gates, Mamba-2's
        conv, dt_bias and A_log, GLA's decay bias)."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(RESIDUAL_OUTPUTS) else 1
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)

    def compile_blocks(self, mode: str | None = None) -> None:
        """torch.compile each block in place; parameter names stay unchanged, so checkpoints load either
        way. `mode` is torch.compile's: "reduce-overhead" replays each block's kernels as CUDA graphs, for
        steps bound by how fast the host launches kernels (a hybrid's fla and mamba-ssm kernels); a training
        loop then calls `torch.compiler.cudagraph_mark_step_begin()` before each step.
        `mode="backbone"`: the whole stack of blocks as one graph instead, for the forward without a decoding
        state (training, evaluation; decoding runs the blocks eagerly). Inductor then fuses across blocks (a
        block's closing residual add with the next one's first norm), at the price of compiling every layer
        rather than one shared block: a first step of about a minute for helios_nova instead of seconds."""
        if mode == BACKBONE:
            self._compiled_stack = torch.compile(run_blocks)
            return
        # the blocks share one compiled forward, and each kind of mixer needs its own variants of it
        # (training, evaluation, without gradients, dynamic batch): dynamo's cap of 8 per mixer kind, for
        # each model compiled in the process (a teacher's blocks share the code of the student's)
        kinds = len({type(block.mixer) for block in self.blocks})
        torch._dynamo.config.recompile_limit += 8 * kinds
        # CUDA graphs record a graph per input shape; sampling stages pad their batches to a few shapes
        # (`training/batching.py`). Inductor's `cudagraph_skip_dynamic_graphs` would skip graphs of varying
        # shapes instead, but with it helix_hybrid's blocks ran 10x slower (H200: 6,711 against 66,594
        # tokens/s at 2048 x 4, as torch.compile options; as a global setting, slower still)
        for block in self.blocks:
            block.compile(mode=mode)

    def hidden(self, input_ids: Tensor, state: list | None = None, positions: Tensor | None = None) -> Tensor:
        """input_ids: (batch, seq) -> the final normed hidden states (batch, seq, d_model). Bags of tokens,
        (batch, seq, bag), enter as the mean of their embeddings (token superposition training).
        positions (batch, seq): rows of packed documents, each token's position in its own document (0
        where one starts); every mixer then keeps the documents apart, so each is modelled as if alone."""
        if state is not None and positions is not None:
            # a decoding state continues one sequence per row; no mixer carries one across documents
            raise ValueError("a decoding state and packed-document positions cannot be given together: "
                             "decode each document in its own row")
        if input_ids.dim() == 3:  # each bag's mean straight from the table, not its bag of embeddings first
            x = F.embedding_bag(input_ids.flatten(0, 1), self.embed.weight, mode="mean").unflatten(0, input_ids.shape[:2])
        else:
            x = self.embed(input_ids)
        x = to_residual_stream(x)
        if state is None:
            run = self._compiled_stack or run_blocks
            x = run(self.blocks, x, positions, self.cfg.activation_checkpointing and self.training)
        else:
            for block, block_state in zip(self.blocks, state, strict=True):
                x = block(x, block_state, positions)
        return self.norm(x)

    def forward(self, input_ids: Tensor, state: list | None = None, positions: Tensor | None = None) -> Tensor:
        """input_ids: (batch, seq) -> logits (batch, seq, vocab). `state` (from `init_state`) decodes on;
        `positions`: packed documents (`hidden`)."""
        return self.head(self.hidden(input_ids, state, positions))

    def next_token_logits(self, input_ids: Tensor, state: list) -> Tensor:
        """Feeds input_ids (batch, seq) into the decoding state -> logits of the last position only,
        (batch, vocab): a long prompt's prefill never makes its (seq, vocab) logits."""
        return self.head(self.hidden(input_ids, state)[:, -1])

    def head(self, hidden: Tensor) -> Tensor:
        logits = self.lm_head(hidden)
        if self.cfg.logit_softcap:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits

    def loss(self, input_ids: Tensor, labels: Tensor, z_loss: float = 0.0, chunk_tokens: int = 8192,
             positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Training loss without the whole batch's logits: (loss with z-loss, cross-entropy), as
        `lm_loss(self(input_ids, positions=positions), labels, z_loss)` computes them (`chunked_lm_loss`).
        Labels of shape (batch, seq, bag) are bags of targets, each with 1/bag of the probability: the
        multi-hot cross-entropy, the mean of the bag's cross-entropies (token superposition training)."""
        hidden = self.hidden(input_ids, positions=positions)
        if labels.dim() == 2:
            return chunked_lm_loss(hidden, self.lm_head.weight, labels, self.cfg.logit_softcap, z_loss, chunk_tokens)
        losses = [chunked_lm_loss(hidden, self.lm_head.weight, labels[..., j], self.cfg.logit_softcap, z_loss,
                                  chunk_tokens) for j in range(labels.size(-1))]
        return tuple(torch.stack(parts).mean() for parts in zip(*losses))

    def token_logprobs(self, input_ids: Tensor, labels: Tensor, chunk_tokens: int = 1024,
                       temperature: float = 1.0) -> Tensor:
        """log p(label) per position, 0 where labels == IGNORE_INDEX: (batch, seq) float32, as
        `token_logprobs(self(input_ids) / temperature, labels)` computes it, without the whole batch's logits."""
        return chunked_token_logprobs(self.hidden(input_ids), self.lm_head.weight, labels, self.cfg.logit_softcap,
                                      chunk_tokens, temperature)

    def init_state(self, batch_size: int, max_len: int) -> list:
        """One decoding state per layer (KV cache for attention, fixed-size state for recurrent mixers)."""
        p = self.lm_head.weight
        return [b.mixer.init_state(batch_size, max_len, p.device, p.dtype) for b in self.blocks]

    def generate(self, prompt: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """Batched sampling with the decoding state: `slmlab.models.generate.generate`."""
        return generate(self, prompt, max_new_tokens, **kwargs)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n - self.embed.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int, bag: int = 1, positions: Tensor | None = None) -> float | Tensor:
        """Training FLOPs per token (forward + backward = 3x forward) at this sequence length.

        Forward: 2 FLOPs per multiply-accumulate of every matmul (mixer projections, MLP, LM head) plus
        each mixer's own sequence-mixing term; the embedding lookup is free. With bags of `bag` tokens
        per position (token superposition training, `seq_len` positions), per token of data: the
        blocks run once per bag, the LM head once per target. With packed documents (`positions`, as
        `hidden` takes them) the mixers count within each document: a tensor on positions' device.
        """
        d, h = self.cfg.d_model, self.cfg.ffn_hidden
        per_layer_mlp = 2 * 3 * d * h
        mixers = sum(b.mixer.flops_per_token(seq_len, positions) for b in self.blocks)
        head = 2 * d * self.cfg.vocab_size
        # a frozen matrix (the base weights under LoRA) needs no weight gradient: 2 FLOPs per weight fewer
        frozen_blocks = sum(frozen_weights(m) for m in self.blocks.modules() if isinstance(m, nn.Linear))
        return 3 * ((mixers + self.cfg.n_layers * per_layer_mlp) / bag + head) \
            - 2 * (frozen_blocks / bag + frozen_weights(self.lm_head))
