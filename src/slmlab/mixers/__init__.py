"""Sequence mixers: each maps (batch, seq, d_model) -> (batch, seq, d_model) behind one contract.

    mixer = MIXERS[name](cfg: ModelConfig, layer_idx: int)
    y = mixer(x, state=None, positions=None)  # training / prefill; with a state, decoding continues it;
                                              # positions: packed documents, each modelled alone
    state = mixer.init_state(batch_size, max_len, device, dtype)
    mixer.flops_per_token(seq_len, positions=None)  # forward FLOPs per token, for an honest MFU
    MIXERS[name].compiles_kernels             # whether its CUDA path compiles kernels at the first call
"""

from slmlab.mixers.attention import Attention
from slmlab.mixers.gla import GLA
from slmlab.mixers.hgrn2 import HGRN2
from slmlab.mixers.mamba2 import Mamba2
from slmlab.mixers.sparse_attention import SparseAttention

MIXERS = {"attention": Attention, "sparse_attention": SparseAttention, "gla": GLA, "hgrn2": HGRN2, "mamba2": Mamba2}


def mixer_class(name: str) -> type:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; available: {sorted(MIXERS)}")
    return MIXERS[name]
