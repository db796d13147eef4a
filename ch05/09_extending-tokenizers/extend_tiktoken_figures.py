"""The two kinds of figure in extend-tiktoken.ipynb, kept here so the notebook's cells stay short.

`show_tokens` draws how tokenizers cut texts into tokens (one row of boxes per
tokenizer, new ids highlighted); `show_grown_rows` draws a small weight matrix before
and after `resize_token_embeddings`.
"""

import matplotlib.pyplot as plt
import tiktoken
import torch
from matplotlib.patches import Rectangle

NEW_COLOR, OLD_COLOR = "#f4a259", "#8cb8d8"


def show_tokens(rows: list[tuple[str, tiktoken.Encoding, str]], first_new_id: int = 50257,
                title: str | None = None) -> plt.Figure:
    """One row of boxes per (label, tokenizer, text): each box is a token, its id under it.

    Ids from `first_new_id` on (tokens we added) are drawn in orange, GPT-2's own in blue.
    """
    fig, ax = plt.subplots(figsize=(10, 0.9 * len(rows) + 0.6))
    right = 0.0
    for r, (label, tokenizer, text) in enumerate(rows):
        y = -1.3 * r
        ax.text(-0.2, y + 0.4, label, ha="right", va="center", fontsize=9)
        x = 0.0
        for token_id in tokenizer.encode(text, allowed_special="all"):
            piece = tokenizer.decode([token_id]).replace(" ", "\u2423").replace("\n", "\\n")
            width = 0.14 * max(len(piece), 2) + 0.2
            color = NEW_COLOR if token_id >= first_new_id else OLD_COLOR
            ax.add_patch(Rectangle((x, y), width, 0.8, facecolor=color, edgecolor="white"))
            ax.text(x + width / 2, y + 0.4, piece, ha="center", va="center", fontsize=8, family="monospace")
            ax.text(x + width / 2, y - 0.18, str(token_id), ha="center", va="center", fontsize=6, color="0.35")
            x += width
        right = max(right, x)
    ax.set_xlim(-2.6, max(right, 9.0) + 0.1)
    ax.set_ylim(-1.3 * (len(rows) - 1) - 0.45, 1.25)
    ax.legend(handles=[Rectangle((0, 0), 1, 1, color=OLD_COLOR), Rectangle((0, 0), 1, 1, color=NEW_COLOR)],
              labels=["GPT-2's id", "added id"], loc="upper right", ncol=2, fontsize=8, frameon=False)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    return fig


def show_grown_rows(old: torch.Tensor, new: torch.Tensor, labels: list[str]) -> plt.Figure:
    """Heat maps of a (tokens x features) matrix before and after growing it, new rows framed."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), gridspec_kw={"width_ratios": [old.shape[0], new.shape[0]]})
    limit = new.abs().max().item()
    for ax, matrix, when in ((axes[0], old, "before"), (axes[1], new, "after")):
        ax.imshow(matrix.detach().T, cmap="coolwarm", vmin=-limit, vmax=limit)
        ax.set_title(f"{when}: {matrix.shape[0]} rows", fontsize=10)
        ax.set_xticks(range(matrix.shape[0]), labels[:matrix.shape[0]], rotation=45, ha="right", fontsize=8)
        ax.set_yticks([])
    for i in range(old.shape[0], new.shape[0]):
        axes[1].add_patch(Rectangle((i - 0.5, -0.5), 1, new.shape[1], fill=False, edgecolor="black", linewidth=2))
    axes[0].set_ylabel("embedding dimensions")
    fig.tight_layout()
    return fig
