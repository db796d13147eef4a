"""The course's optimized GPT model of `01_opt_single_gpu.py` and `02_opt_multi_gpu_ddp.py`.

The course rewrites the chapter's model with PyTorch's own layers: one fused linear
layer for queries, keys and values plus `scaled_dot_product_attention`
(`PyTorchMultiHeadAttention`), `nn.LayerNorm` and `nn.GELU(approximate="tanh")`. The
classes below have the course's names, signatures and parameter names (`att.qkv`,
`att.proj`, `norm1.weight`, ...), so its state dicts load here. They reuse the chapter's
`forward` methods: only the layers inside differ.

Our command-line flags reach the same computation differently (`--sdpa --native-ops`
swap modules inside the chapter's model and keep the chapter's parameter names); the
tests check that both give the same logits for the same weights.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from previous_chapters import FeedForward as ChapterFeedForward
from previous_chapters import GPTModel as ChapterGPTModel
from previous_chapters import TransformerBlock as ChapterTransformerBlock


class PyTorchMultiHeadAttention(nn.Module):
    """Causal multi-head attention: one matrix product for Q, K and V, then PyTorch's fused
    attention kernel (FlashAttention on GPUs), which needs no stored mask."""

    def __init__(self, d_in: int, d_out: int, num_heads: int, dropout: float = 0.0, qkv_bias: bool = False):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads}).")
        self.num_heads, self.head_dim, self.d_out = num_heads, d_out // num_heads, d_out
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.proj = nn.Linear(d_out, d_out)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, num_tokens, _ = x.shape
        # (b, T, 3 * d_out) -> (3, b, heads, T, head_dim): queries, keys, values
        qkv = self.qkv(x).view(batch_size, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        queries, keys, values = qkv
        context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=None, is_causal=True,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.proj(context.transpose(1, 2).contiguous().view(batch_size, num_tokens, self.d_out))


class FeedForward(ChapterFeedForward):
    """The chapter's feed-forward block with PyTorch's fused tanh-approximate GELU."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.layers[1] = nn.GELU(approximate="tanh")


class TransformerBlock(ChapterTransformerBlock):
    """The chapter's block with `PyTorchMultiHeadAttention` and `nn.LayerNorm`."""

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.att = PyTorchMultiHeadAttention(d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], num_heads=cfg["n_heads"],
                                             dropout=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1 = nn.LayerNorm(cfg["emb_dim"])
        self.norm2 = nn.LayerNorm(cfg["emb_dim"])


class GPTModel(ChapterGPTModel):
    """The chapter's GPT model built from the blocks above and a final `nn.LayerNorm`."""

    def __init__(self, cfg: dict):
        super().__init__({**cfg, "n_layers": 0})  # the chapter's embeddings, dropout and head
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = nn.LayerNorm(cfg["emb_dim"])


def state_dict_from_chapter(chapter_state: dict) -> dict:
    """A chapter `GPTModel` state dict renamed and reshaped for this module's `GPTModel`:
    W_query/W_key/W_value become one `qkv` matrix, `out_proj` becomes `proj`,
    LayerNorm's `scale`/`shift` become `weight`/`bias`, and the stored masks are dropped."""
    out = {}
    for name, tensor in chapter_state.items():
        if name.endswith(".att.mask"):
            continue
        if ".att.W_query." in name:
            kind = name.rsplit(".", 1)[1]
            prefix = name.split(".att.")[0] + ".att."
            out[prefix + "qkv." + kind] = torch.cat([chapter_state[prefix + f"W_{w}.{kind}"]
                                                     for w in ("query", "key", "value")])
            continue
        if ".att.W_key." in name or ".att.W_value." in name:
            continue
        name = name.replace(".att.out_proj.", ".att.proj.").replace(".scale", ".weight").replace(".shift", ".bias")
        out[name] = tensor
    return out
