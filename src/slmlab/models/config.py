"""The one config dataclass every model is built from; presets live in `conf/model/*.yaml`."""

import re
from dataclasses import dataclass

from slmlab.ops.backend import ATTENTION_KERNELS, KERNELS, MLP_KERNELS

# one-letter names for layouts: "M*6,G*16,S*6" = 6 mamba2, 16 gla, 6 sparse_attention layers
MIXER_LETTERS = {"A": "attention", "S": "sparse_attention", "G": "gla", "H": "hgrn2", "M": "mamba2"}


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
    # per-layer mixers for hybrids: comma-separated `name` or `name*count` (names or MIXER_LETTERS),
    # e.g. "M*6,G*16,S*6"; None: `mixer` in every layer
    layout: str | None = None
    norm: str = "rms"  # rms | zc_rms (zero-centred: weight stored as an offset from 1)
    residual: str = "plain"  # plain: x + f(norm(x)); gated: x + sigmoid(g) * f(norm(x)), g a scalar per branch
    rope_layers: str = "all"  # all | even | none: the layers whose mixer rotates q and k
    rope_theta: float = 10_000.0
    qk_norm: bool = False
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    init_std: float = 0.02
    # sparse attention (mixers/sparse_attention.py): causal sliding window plus the first
    # `global_tokens` positions, which every query sees
    sliding_window: int = 1024
    global_tokens: int = 32
    # which implementation the recurrent mixers run: auto = the CUDA kernel when on CUDA and
    # importable, else the pure-PyTorch reference; torch | fla | mamba_ssm force one
    kernel: str = "auto"
    # causal softmax attention on CUDA: auto = FlashAttention 4 (`flash_attn.cute`) where it imports and
    # the GPU is Hopper or newer, else SDPA; sdpa | flash_attn force one (ops/flash_attention.py)
    attention_kernel: str = "auto"
    # the SwiGLU MLP's training forward and backward on CUDA: torch = cuBLAS matmuls around slmlab's
    # activation op; quack = quack's GEMMs with the activation and its gradient in their epilogues
    # (Hopper or newer; each new batch x seq autotunes once, minutes, then reads its winner from disk,
    # helios_nova's at batch 16 x 2048 shipped for the H100 (ops/autotune_cache.py):
    # for stages of one shape: pretraining, SFT, distillation, DPO on fixed pairs; GRPO and on-policy
    # DPO, whose sampled batches change shape, refuse it)
    mlp_kernel: str = "torch"
    # recompute each block's activations in the backward pass instead of keeping them: memory per
    # token drops to about one residual stream per layer, for ~1/3 more compute
    activation_checkpointing: bool = False
    # GLA (mixers/gla.py): heads = n_heads, key/value dim per head = head_dim
    gla_decay_init: float = 0.9  # exp(log-decay) of every key channel at initialisation
    # HGRN2 (mixers/hgrn2.py): per-head state expand_ratio x (d_model / heads)
    hgrn2_expand_ratio: int = 128
    # Mamba-2 (mixers/mamba2.py), mamba-ssm's parameter layout
    ssm_d_state: int = 128
    ssm_d_conv: int = 4
    ssm_expand: int = 2
    ssm_headdim: int = 64
    ssm_ngroups: int = 1
    ssm_dt_min: float = 0.001
    ssm_dt_max: float = 0.1

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        # sizes and divisors; a zero one built a model that ran on silently, or failed far from its key
        for key in ("vocab_size", "d_model", "max_seq_len", "n_heads", "n_kv_heads", "hgrn2_expand_ratio",
                    "ssm_headdim", "ssm_ngroups"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)} must be at least 1")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim < 1:
            raise ValueError(f"model.head_dim={self.head_dim} must be at least 1")
        if self.norm_eps < 0:
            raise ValueError(f"model.norm_eps={self.norm_eps} must be at least 0")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (GQA)")
        for key, value, allowed in (("norm", self.norm, ("rms", "zc_rms")), ("residual", self.residual, ("plain", "gated")),
                                    ("rope_layers", self.rope_layers, ("all", "even", "none")),
                                    ("kernel", self.kernel, KERNELS),
                                    ("attention_kernel", self.attention_kernel, ATTENTION_KERNELS),
                                    ("mlp_kernel", self.mlp_kernel, MLP_KERNELS)):
            if value not in allowed:
                raise ValueError(f"model.{key}={value!r} is not one of {allowed}")
        if self.layout is not None and self.mixer != "attention":
            # the layout names every layer's mixer: `mixer` would be dropped without a word
            raise ValueError(f"model.mixer={self.mixer!r} is not used where model.layout={self.layout!r} gives each "
                             f"layer's mixer: set model.layout=null to run {self.mixer} in every layer, or change the layout")
        self.layer_mixers = self._parse_layout()
        self._check_mixer_settings(set(self.layer_mixers))
        # RoPE rotates pairs of channels: an odd head would fail at the first forward with a shape mismatch
        rotated = {name for i, name in enumerate(self.layer_mixers) if self.rope_on(i)}
        for key, names in (("head_dim", {"attention", "sparse_attention"}), ("hgrn2_expand_ratio", {"hgrn2"})):
            if rotated & names and getattr(self, key) % 2:
                raise ValueError(f"model.{key}={getattr(self, key)} must be even: RoPE rotates pairs of channels "
                                 f"(rope_layers={self.rope_layers!r} reaches {', '.join(sorted(rotated & names))} layers)")
        if rotated & {"attention", "sparse_attention", "hgrn2"} and self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta={self.rope_theta} must be positive (its inverse powers are RoPE's frequencies)")

    def _check_mixer_settings(self, used: set[str]) -> None:
        """The settings of the mixers in `used`, in the ranges their layers can be built and run with (the
        settings of mixers no layer has are not read)."""
        if "mamba2" in used:
            if self.ssm_d_conv < 2:  # decoding keeps the last d_conv - 1 inputs
                raise ValueError(f"model.ssm_d_conv={self.ssm_d_conv} must be at least 2 (mamba-ssm's kernel takes 2-4)")
            for key in ("ssm_d_state", "ssm_expand"):
                if getattr(self, key) < 1:
                    raise ValueError(f"model.{key}={getattr(self, key)} must be at least 1")
            if not 0 < self.ssm_dt_min <= self.ssm_dt_max:  # the initial steps are log-uniform between them
                raise ValueError(f"model.ssm_dt_min={self.ssm_dt_min} and model.ssm_dt_max={self.ssm_dt_max} must "
                                 f"satisfy 0 < ssm_dt_min <= ssm_dt_max")
        if "gla" in used and not 0 < self.gla_decay_init < 1:  # stored as its logit in the decay's bias
            raise ValueError(f"model.gla_decay_init={self.gla_decay_init} must lie strictly between 0 and 1")
        if "sparse_attention" in used and (self.sliding_window < 1 or self.global_tokens < 0):
            # a window of 0 left queries beyond the global tokens attending to nothing
            raise ValueError(f"model.sliding_window={self.sliding_window} must be at least 1 and "
                             f"model.global_tokens={self.global_tokens} at least 0")

    def _parse_layout(self) -> list[str]:
        if self.layout is None:
            return [self.mixer] * self.n_layers
        names = []
        for part in self.layout.replace(" ", "").split(","):
            match = re.fullmatch(r"(\w+)(?:\*(\d+))?", part)
            if match is None:
                raise ValueError(f"model.layout={self.layout!r}: cannot read {part!r}; write name*count, e.g. M*6,G*16,S*6")
            name, count = match.group(1), int(match.group(2) or 1)
            names += [MIXER_LETTERS.get(name, name)] * count
        if len(names) != self.n_layers:
            raise ValueError(f"model.layout={self.layout!r} gives {len(names)} layers but model.n_layers={self.n_layers}")
        return names

    def rope_on(self, layer_idx: int) -> bool:
        return self.rope_layers == "all" or (self.rope_layers == "even" and layer_idx % 2 == 0)

    def mlp_kernel_in_use(self) -> str:
        """`mlp_kernel`, unless `kernel=torch` sends every layer down its PyTorch path."""
        return "torch" if self.kernel == "torch" else self.mlp_kernel
