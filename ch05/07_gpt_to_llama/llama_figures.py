"""The figures of this folder's three notebooks, drawn with matplotlib.

Each function takes the numbers or tensors a notebook cell has just computed and
returns a `matplotlib.figure.Figure`, so the cells stay about Llama and every picture
shows what the code beside it computed. The diagrams (blocks, head sharing) are drawn
from one small box-and-arrow helper.
"""

import math

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

NEW = "#fde6c8"       # fill of a part that Llama changes
NEW_EDGE = "#d9822b"
SAME = "#e6eef8"      # fill of a part that stays as in GPT-2
SAME_EDGE = "#4a6fa5"
GPT_COLOR = "#1f77b4"
LLAMA_COLOR = "#d62728"


def _box(ax, x: float, y: float, text: str, width: float = 2.4, height: float = 0.55, new: bool = False,
         fontsize: float = 9) -> None:
    """A rounded box centred on (x, y); orange when `new`."""
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height,
                                facecolor=NEW if new else SAME, edgecolor=NEW_EDGE if new else SAME_EDGE,
                                boxstyle="round,pad=0.02,rounding_size=0.08"))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], color: str = "#555555") -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, color=color, lw=1))


def _stack(ax, x: float, labels: list[tuple[str, bool]], title: str) -> None:
    """Boxes from bottom to top joined by arrows, with a title above."""
    for i, (label, new) in enumerate(labels):
        _box(ax, x, i, label, new=new)
        if i:
            _arrow(ax, (x, i - 0.72), (x, i - 0.28))
    ax.text(x, len(labels) - 0.2, title, ha="center", va="bottom", fontsize=11, weight="bold")


def architecture_comparison() -> Figure:
    """GPT-2's model next to Llama 2's, bottom (token ids) to top (logits); changed parts in orange."""
    gpt = [("token ids", False), ("token embedding\n+ position embedding", False), ("dropout", False),
           ("LayerNorm", False), ("multi-head attention\n(biases, dropout)", False), ("+ shortcut", False),
           ("LayerNorm", False), ("feed-forward: Linear,\nGELU, Linear", False), ("+ shortcut", False),
           ("final LayerNorm", False), ("output head -> logits", False)]
    llama = [("token ids", False), ("token embedding\n(no position embedding)", True), ("(no dropout)", True),
             ("RMSNorm", True), ("multi-head attention\n+ RoPE on queries, keys", True), ("+ shortcut", False),
             ("RMSNorm", True), ("SwiGLU feed-forward:\nSiLU(fc1) * fc2 -> fc3", True), ("+ shortcut", False),
             ("final RMSNorm", True), ("output head -> logits", False)]
    fig, ax = plt.subplots(figsize=(7.5, 7.2))
    _stack(ax, 0, gpt, "GPT-2 (chapter 4)")
    _stack(ax, 3.6, llama, "Llama 2")
    for x in (0, 3.6):  # the repeated block
        ax.add_patch(plt.Rectangle((x - 1.45, 2.55), 2.9, 6.0, fill=False, ls="--", ec="#888888"))
        ax.text(x + 1.5, 5.5, "x n_layers", rotation=90, va="center", fontsize=8, color="#666666")
    ax.set_xlim(-1.7, 5.6)
    ax.set_ylim(-0.6, len(gpt) + 0.4)
    ax.axis("off")
    fig.tight_layout()
    return fig


def norm_comparison(x: torch.Tensor, layernorm_out: torch.Tensor, rmsnorm_out: torch.Tensor) -> Figure:
    """One token's features before and after LayerNorm and RMSNorm, with each one's mean and RMS."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8), sharey=True)
    for ax, values, title in zip(axes, (x, layernorm_out, rmsnorm_out), ("input", "LayerNorm", "RMSNorm"),
                                 strict=True):
        values = values.detach().float()
        ax.bar(range(len(values)), values, color="#9bbbe0")
        mean, rms = values.mean().item(), values.pow(2).mean().sqrt().item()
        ax.axhline(mean, color=LLAMA_COLOR, lw=1.5, label=f"mean {mean:+.2f}")
        ax.axhline(rms, color="black", ls=":", lw=1.5, label=f"RMS {rms:.2f}")
        ax.axhline(0, color="#999999", lw=0.5)
        ax.set_title(title)
        ax.set_xlabel("feature")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def activation_comparison(xs: torch.Tensor, gelu: torch.Tensor, silu: torch.Tensor) -> Figure:
    """GELU (GPT-2) and SiLU (Llama) over the same inputs."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(xs, gelu, color=GPT_COLOR, label="GELU (GPT-2)")
    ax.plot(xs, silu, "--", color=LLAMA_COLOR, label="SiLU = x * sigmoid(x) (Llama)")
    ax.axhline(0, color="#999999", lw=0.5)
    ax.set_xlabel("x")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def swiglu_diagram(emb_dim: int, gpt_hidden: int, llama_hidden: int) -> Figure:
    """GPT-2's feed-forward (one path) next to SwiGLU (a gate path times an up path), with matrix sizes."""
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for y, label in zip((0, 1.2, 2.4, 3.6), (f"x ({emb_dim})", f"Linear {emb_dim} -> {gpt_hidden}", "GELU",
                                             f"Linear {gpt_hidden} -> {emb_dim}"), strict=True):
        _box(ax, 0, y, label)
        if y:
            _arrow(ax, (0, y - 0.9), (0, y - 0.3))
    ax.text(0, 4.3, "GPT-2 feed-forward", ha="center", weight="bold")
    _box(ax, 5, 0, f"x ({emb_dim})")
    _box(ax, 3.5, 1.2, f"fc1 (gate) {emb_dim} -> {llama_hidden}", width=2.9, new=True)
    _box(ax, 6.5, 1.2, f"fc2 (up) {emb_dim} -> {llama_hidden}", width=2.9, new=True)
    _box(ax, 3.5, 2.2, "SiLU", width=1.4, new=True)
    _box(ax, 5, 3.2, "multiply elementwise", width=2.6, new=True)
    _box(ax, 5, 4.2, f"fc3 (down) {llama_hidden} -> {emb_dim}", width=2.9, new=True)
    for x in (3.5, 6.5):
        _arrow(ax, (5, 0.3), (x, 0.9))
    _arrow(ax, (3.5, 1.5), (3.5, 1.9))
    _arrow(ax, (3.5, 2.5), (4.5, 2.9))
    _arrow(ax, (6.5, 1.5), (5.5, 2.9))
    _arrow(ax, (5, 3.5), (5, 3.9))
    ax.text(5, 4.75, "Llama's SwiGLU feed-forward", ha="center", weight="bold")
    ax.set_xlim(-1.5, 8.2)
    ax.set_ylim(-0.5, 5.0)
    ax.axis("off")
    fig.tight_layout()
    return fig


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor, pairs: tuple[int, ...], positions: int) -> Figure:
    """Where RoPE turns the 2-D vector (1, 0) of feature pair i at positions 0, 1, 2, ...: one panel per pair."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 3.3))
    colors = plt.cm.viridis(np.linspace(0, 0.9, positions))
    for ax, pair in zip(np.atleast_1d(axes), pairs, strict=True):
        ax.add_patch(plt.Circle((0, 0), 1, fill=False, color="#bbbbbb"))
        for m in range(positions):
            c, s = cos[m, pair].item(), sin[m, pair].item()
            ax.annotate("", xy=(c, s), xytext=(0, 0), arrowprops={"arrowstyle": "-|>", "color": colors[m]})
            ax.text(1.15 * c, 1.15 * s, str(m), fontsize=7, ha="center", va="center", color=colors[m])
        turn = math.atan2(sin[1, pair].item(), cos[1, pair].item())
        ax.set_title(f"pair {pair}: {math.degrees(turn):.1f} degrees per position", fontsize=9)
        ax.set_xlim(-1.35, 1.35)
        ax.set_ylim(-1.35, 1.35)
        ax.set_aspect("equal")
        ax.axis("off")
    fig.suptitle("RoPE rotates each feature pair by position x its own angle (labels: positions)", fontsize=10)
    fig.tight_layout()
    return fig


def rope_score_map(scores: torch.Tensor) -> Figure:
    """Attention scores q_m . k_n of one query and one key placed at every pair of positions (m, n)."""
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    image = ax.imshow(scores, cmap="coolwarm", origin="lower")
    ax.set_xlabel("key position n")
    ax.set_ylabel("query position m")
    ax.set_title("q.k after RoPE: constant along m - n = const", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def rope_cos_table(cos: torch.Tensor) -> Figure:
    """cos(m * theta_i) for every position m and feature pair i: fast pairs on top, slow ones at the bottom."""
    fig, ax = plt.subplots(figsize=(7, 2.8))
    image = ax.imshow(cos[:, : cos.shape[1] // 2].T, aspect="auto", cmap="coolwarm", interpolation="nearest")
    ax.set_xlabel("position m")
    ax.set_ylabel("feature pair i")
    ax.set_title("cos of the RoPE angle of every position and pair", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def gqa_sharing(num_heads: int, settings: tuple[tuple[str, int], ...]) -> Figure:
    """Which key/value head each query head reads, for several numbers of key/value heads."""
    fig, axes = plt.subplots(len(settings), 1, figsize=(8, 1.6 * len(settings)))
    palette = plt.cm.tab10(np.arange(10))
    for ax, (title, num_kv) in zip(np.atleast_1d(axes), settings, strict=True):
        group = num_heads // num_kv
        for h in range(num_heads):
            color = palette[(h // group) % 10]
            ax.add_patch(plt.Rectangle((h - 0.4, 1.0), 0.8, 0.5, color=color, alpha=0.35))
            ax.text(h, 1.25, f"Q{h}", ha="center", va="center", fontsize=8)
            kv_x = (h // group) * group + (group - 1) / 2
            ax.plot([h, kv_x], [1.0, 0.5], color=color, lw=1)
        for g in range(num_kv):
            x = g * group + (group - 1) / 2
            width = max(0.8, group - 0.2)
            ax.add_patch(plt.Rectangle((x - width / 2, 0.0), width, 0.5, color=palette[g % 10], alpha=0.8))
            ax.text(x, 0.25, f"K{g} V{g}", ha="center", va="center", fontsize=8, color="white", weight="bold")
        ax.set_title(f"{title}: {num_heads} query heads, {num_kv} key/value head(s)", fontsize=10)
        ax.set_xlim(-0.7, num_heads - 0.3)
        ax.set_ylim(-0.1, 1.6)
        ax.axis("off")
    fig.tight_layout()
    return fig


def rope_wavelengths(head_dim: int, bases: tuple[float, ...], context_length: int) -> Figure:
    """Positions per full turn of each feature pair, for several RoPE bases."""
    pairs = torch.arange(0, head_dim, 2) / head_dim
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for base, color in zip(bases, (GPT_COLOR, LLAMA_COLOR, "#2ca02c"), strict=False):
        ax.semilogy(2 * math.pi * base ** pairs, color=color, label=f"base {base:,.0f}")
    ax.axhline(context_length, color="gray", ls=":", label=f"{context_length:,} tokens")
    ax.set_xlabel("feature pair i")
    ax.set_ylabel("wavelength (positions)")
    ax.legend()
    fig.tight_layout()
    return fig


def rope_scaling(inv_freq: torch.Tensor, scaled: torch.Tensor, original_context_length: int,
                 low_freq_factor: float, high_freq_factor: float) -> Figure:
    """Llama 3.1's frequency scaling: wavelengths before and after, with the band that is blended."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.semilogy(2 * math.pi / inv_freq, color=GPT_COLOR, label="Llama 3 (unscaled)")
    ax.semilogy(2 * math.pi / scaled, "--", color=LLAMA_COLOR, label="Llama 3.1 (scaled)")
    ax.axhline(original_context_length, color="gray", ls=":", label=f"original context {original_context_length:,}")
    ax.axhspan(original_context_length / high_freq_factor, original_context_length / low_freq_factor,
               color="#f2e2a0", alpha=0.5, label="blended band")
    ax.set_xlabel("feature pair i")
    ax.set_ylabel("wavelength (positions)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tied_embeddings(vocab_size: int, emb_dim: int, other_params: int) -> Figure:
    """How much of Llama 3.2 1B's parameter count an untied output head would add."""
    embedding = vocab_size * emb_dim
    fig, ax = plt.subplots(figsize=(7, 2.4))
    for y, parts in enumerate(((embedding, other_params, 0), (embedding, other_params, embedding))):
        left = 0
        for value, color, name in zip(parts, (LLAMA_COLOR, "#9bbbe0", "#f4a582"),
                                      ("token embedding = output head", "transformer blocks", "separate head"),
                                      strict=True):
            if value:
                ax.barh(y, value / 1e9, left=left / 1e9, color=color, label=name if y else None)
                left += value
        ax.text(left / 1e9 + 0.02, y, f"{left / 1e9:.2f}B", va="center", fontsize=9)
    ax.set_yticks([0, 1], ["tied (one matrix)", "untied (two copies)"])
    ax.set_xlabel("parameters (billions)")
    ax.set_xlim(0, 1.75)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3)
    fig.tight_layout()
    return fig


def qk_permutation(head_dim: int) -> Figure:
    """Which of Meta's query/key rows (one head) lands in which row of the "rotate half" layout."""
    half = head_dim // 2
    fig, ax = plt.subplots(figsize=(7, 2.6))
    palette = plt.cm.tab10(np.arange(10))
    for row in range(head_dim):
        pair = row // 2
        ax.add_patch(plt.Rectangle((row - 0.45, 1.0), 0.9, 0.5, color=palette[pair % 10], alpha=0.7))
        ax.text(row, 1.25, f"{pair}{'ab'[row % 2]}", ha="center", va="center", fontsize=8)
        target = pair if row % 2 == 0 else half + pair
        ax.add_patch(plt.Rectangle((target - 0.45, 0.0), 0.9, 0.5, color=palette[pair % 10], alpha=0.7))
        ax.text(target, 0.25, f"{pair}{'ab'[row % 2]}", ha="center", va="center", fontsize=8)
        ax.plot([row, target], [1.0, 0.5], color=palette[pair % 10], lw=1)
    ax.text(-0.8, 1.25, "Meta: pairs side by side", ha="right", va="center", fontsize=9)
    ax.text(-0.8, 0.25, "ours / Hugging Face:\npair i = rows i and i + d/2", ha="right", va="center", fontsize=9)
    ax.set_xlim(-6.5, head_dim)
    ax.set_ylim(-0.2, 1.7)
    ax.axis("off")
    ax.set_title(f"permute() on one head's rows (head_dim {head_dim}); 'a' and 'b' rotate together", fontsize=10)
    fig.tight_layout()
    return fig
