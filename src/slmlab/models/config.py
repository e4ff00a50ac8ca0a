"""The one config dataclass every model is built from; presets live in `conf/model/*.yaml`."""

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """A decoder-only LM: embedding, `n_layers` pre-norm blocks (mixer + SwiGLU MLP), norm, head.

    Attention fields (`n_heads`, `n_kv_heads`, `head_dim`, `rope_theta`, `qk_norm`) describe the
    attention mixer; `mixer` names the sequence mixer of every layer (see `slmlab.mixers.MIXERS`).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int
    n_kv_heads: int | None = None  # None: multi-head attention (= n_heads)
    head_dim: int | None = None  # None: d_model // n_heads
    max_seq_len: int = 2048
    mixer: str = "attention"
    rope_theta: float = 10_000.0
    qk_norm: bool = False
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (GQA)")
