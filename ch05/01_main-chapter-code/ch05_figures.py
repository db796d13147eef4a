"""The figures of ch05.ipynb and exercise-solutions.ipynb, drawn with matplotlib.

Every function takes the real tensors and numbers of the notebook and returns a
`matplotlib.figure.Figure`, so that the notebook's cells stay about the chapter
and each picture shows what the code next to it computed. The diagrams (the
training loop, `generate`) are drawn from the same small box-and-arrow helper.
"""

import math

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#ff7f0e"
HIGHLIGHT = "#d62728"
MUTED = "#bbbbbb"


#####################################
# Small drawing helpers
#####################################

def _box(ax, x: float, y: float, text: str, width: float, height: float = 0.6, color: str = "#e8f0fa",
         edge: str = "#4a6fa5", fontsize: float = 9, **text_kw) -> None:
    """A rounded box centred on (x, y) with `text` inside."""
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, facecolor=color,
                                edgecolor=edge, boxstyle="round,pad=0.02,rounding_size=0.08"))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, **text_kw)


def _arrow(ax, start: tuple, end: tuple, text: str = "", color: str = "#444444", rad: float = 0.0,
           fontsize: float = 8, text_offset: tuple = (0.0, 0.0)) -> None:
    """An arrow from `start` to `end`, optionally labelled at its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=color,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))
    if text:
        mx, my = (start[0] + end[0]) / 2 + text_offset[0], (start[1] + end[1]) / 2 + text_offset[1]
        ax.text(mx, my, text, ha="center", va="center", fontsize=fontsize, color=color,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})


def _loop_arrow(ax, start: tuple, end: tuple, side_x: float, text: str = "", color: str = "#444444") -> None:
    """A loop-back arrow: from `start` sideways to `side_x`, along it, and back in to `end`."""
    (x0, y0), (x1, y1) = start, end
    ax.plot([x0, side_x, side_x], [y0, y0, y1], color=color, linewidth=1.2)
    _arrow(ax, (side_x, y1), (x1, y1), color=color)
    if text:
        ax.text(side_x, (y0 + y1) / 2, text, ha="center", va="center", fontsize=8, color=color, rotation=90,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})


def _canvas(width: float, height: float, xlim: tuple, ylim: tuple) -> tuple[Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.axis("off")
    return fig, ax


def _show_token(token: str) -> str:
    """A token as text that shows its leading space and survives matplotlib's mathtext."""
    return token.replace("\n", "\\n").replace("$", r"\$").replace(" ", "\u2423")


#####################################
# 5.1 Evaluating generative text models
#####################################

def plot_generation_steps(prompt_tokens: list[str], new_tokens: list[str]) -> Figure:
    """Greedy decoding as a staircase: each step feeds all tokens so far and appends one."""
    n_steps = len(new_tokens)
    width = len(prompt_tokens) + n_steps
    fig, ax = _canvas(min(1.05 * width + 1.5, 15), 0.42 * n_steps + 0.8, (-1.6, width), (-n_steps - 0.2, 0.9))
    for step in range(n_steps):
        row = prompt_tokens + new_tokens[:step + 1]
        for i, token in enumerate(row):
            is_new = i == len(row) - 1
            _box(ax, i + 0.5, -step, _show_token(token)[:9], 0.96, 0.8,
                 color="#fde0dc" if is_new else ("#e8f0fa" if i < len(prompt_tokens) else "#f2f2f2"),
                 edge=HIGHLIGHT if is_new else "#4a6fa5", fontsize=7)
        ax.text(-0.2, -step, f"step {step + 1}", ha="right", va="center", fontsize=8)
    ax.text(0, 0.75, "prompt (blue), tokens generated earlier (grey), the token this step appends (red)",
            fontsize=8, va="center")
    fig.tight_layout()
    return fig


def plot_input_target_shift(input_tokens: list[list[str]], target_tokens: list[list[str]]) -> Figure:
    """Each input position's target is the token one place to its right."""
    n_rows, n_cols = len(input_tokens), len(input_tokens[0])
    fig, ax = _canvas(1.5 * n_cols + 2.2, 1.5 * n_rows + 0.2, (-1.7, 1.5 * n_cols + 0.6), (-1.55 * n_rows + 0.2, 0.7))
    for r in range(n_rows):
        top = -1.55 * r
        ax.text(-0.3, top, "inputs", ha="right", va="center", fontsize=9, color=TRAIN_COLOR)
        ax.text(-0.3, top - 0.85, "targets", ha="right", va="center", fontsize=9, color=HIGHLIGHT)
        for c in range(n_cols):
            x = 1.5 * c + 0.7
            _box(ax, x, top, _show_token(input_tokens[r][c]), 1.3, 0.45, fontsize=9)
            _box(ax, x + 0.75, top - 0.85, _show_token(target_tokens[r][c]), 1.3, 0.45,
                 color="#fde0dc", edge=HIGHLIGHT, fontsize=9)
            _arrow(ax, (x, top - 0.23), (x + 0.72, top - 0.62), color="#888888")
    fig.tight_layout()
    return fig


def plot_cross_entropy_steps(target_probas, labels: list[str], vocab_size: int) -> Figure:
    """Target probabilities -> log -> mean -> negative: cross-entropy one step per panel."""
    p = np.asarray(target_probas, dtype=float).ravel()
    logs = np.log(p)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), gridspec_kw={"width_ratios": [3, 3, 1.2, 1.2]})
    x = np.arange(len(p))
    axes[0].bar(x, p, color=TRAIN_COLOR)
    axes[0].axhline(1 / vocab_size, color=MUTED, linestyle="--", label=f"uniform guess 1/{vocab_size:,}")
    axes[0].set_title("1. probability of each target")
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    axes[0].legend(fontsize=7, loc="upper right")
    axes[1].bar(x, logs, color=VAL_COLOR)
    axes[1].axhline(-math.log(vocab_size), color=MUTED, linestyle="--")
    axes[1].set_title("2. its logarithm")
    for ax in axes[:2]:
        ax.set_xticks(x, labels, rotation=40, ha="right", fontsize=8)
    axes[2].bar([0], [logs.mean()], color=VAL_COLOR)
    axes[2].set_title("3. mean")
    axes[3].bar([0], [-logs.mean()], color=HIGHLIGHT)
    axes[3].set_title("4. negative = loss")
    for ax, value in ((axes[2], logs.mean()), (axes[3], -logs.mean())):
        ax.set_xticks([])
        ax.text(0, value / 2, f"{value:.4f}", ha="center", va="center", color="white", fontsize=9, rotation=90)
    axes[1].set_ylim(min(logs.min(), -math.log(vocab_size)) * 1.1, 0)
    axes[2].set_ylim(axes[1].get_ylim())
    axes[3].set_ylim(0, -axes[1].get_ylim()[0])
    fig.tight_layout()
    return fig


def plot_perplexity(marked_losses: dict[str, float], vocab_size: int) -> Figure:
    """Perplexity e^loss against the loss: the number of equally likely tokens it corresponds to."""
    losses = np.linspace(0, math.log(vocab_size) + 0.5, 200)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(losses, np.exp(losses), color="#444444")
    ax.set_yscale("log")
    for k in (2, 10, 100, 1000, vocab_size):
        ax.plot(math.log(k), k, "o", color=MUTED)
        ax.annotate(f"uniform over {k:,}", (math.log(k), k), xytext=(-8, 6), textcoords="offset points",
                    fontsize=7, color="#777777", ha="right")
    for i, (label, loss) in enumerate(marked_losses.items()):
        ax.plot(loss, math.exp(loss), "o", color=HIGHLIGHT)
        ax.annotate(f"{label}\nloss {loss:.2f}, perplexity {math.exp(loss):,.0f}", (loss, math.exp(loss)),
                    xytext=(10, -24 - 6 * (i % 2)), textcoords="offset points", fontsize=8, color=HIGHLIGHT)
    ax.set_xlabel("cross-entropy loss (nats per token)")
    ax.set_ylabel("perplexity = e$^{loss}$")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_train_val_split(n_train_tokens: int, n_val_tokens: int, context_length: int, batch_size: int,
                         n_train_windows: int, n_val_windows: int) -> Figure:
    """The text as one line of tokens: which windows become training and validation batches."""
    total = n_train_tokens + n_val_tokens
    fig, ax = plt.subplots(figsize=(12, 2.3))
    ax.barh(0, n_train_tokens, height=0.5, color=TRAIN_COLOR, alpha=0.15)
    ax.barh(0, n_val_tokens, left=n_train_tokens, height=0.5, color=VAL_COLOR, alpha=0.15)
    cmap = plt.get_cmap("tab20")
    for w in range(n_train_windows):
        batch = w // batch_size
        ax.barh(0, context_length, left=w * context_length, height=0.5, color=cmap(batch % 20),
                edgecolor="white")
        if w % batch_size == 0:
            ax.text((w + batch_size / 2) * context_length, -0.42, f"batch {batch + 1}", ha="center", fontsize=7)
    for w in range(n_val_windows):
        ax.barh(0, context_length, left=n_train_tokens + w * context_length, height=0.5, color=VAL_COLOR,
                edgecolor="white")
    ax.text(n_train_tokens / 2, 0.45, f"training: first 90% of the characters, {n_train_tokens:,} tokens",
            ha="center", fontsize=9, color=TRAIN_COLOR)
    ax.text(n_train_tokens + n_val_tokens / 2, 0.45, f"validation: {n_val_tokens:,} tokens",
            ha="center", fontsize=9, color=VAL_COLOR)
    ax.set_xlim(0, total)
    ax.set_ylim(-0.6, 0.65)
    ax.set_yticks([])
    ax.set_xlabel(f"token position in the-verdict (each coloured block: one window of {context_length} tokens; "
                  "pale: tokens no window covers)")
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


#####################################
# 5.2 Training
#####################################

def plot_training_loop() -> Figure:
    """`train_model_simple` as a flow chart."""
    fig, ax = _canvas(9, 5.2, (0, 10), (0, 7.4))
    steps = [
        (5, 6.8, "for each epoch", "#f2f2f2"),
        (5, 5.9, "for each batch (inputs, targets)", "#f2f2f2"),
        (5, 5.0, "optimizer.zero_grad()   clear last step's gradients", "#e8f0fa"),
        (5, 4.1, "loss = calc_loss_batch(...)   forward pass, cross-entropy", "#e8f0fa"),
        (5, 3.2, "loss.backward()   gradient of the loss for every weight", "#e8f0fa"),
        (5, 2.3, "optimizer.step()   AdamW moves the weights downhill", "#e8f0fa"),
    ]
    for x, y, text, color in steps:
        _box(ax, x, y, text, 6.2, 0.6, color=color)
    for (_, y0, _, _), (_, y1, _, _) in zip(steps, steps[1:], strict=False):
        _arrow(ax, (5, y0 - 0.3), (5, y1 + 0.3))
    _box(ax, 5, 1.2, "every eval_freq steps: evaluate_model()\ntraining and validation loss, dropout off", 6.2, 0.8,
         color="#fff2e0", edge=VAL_COLOR)
    _arrow(ax, (5, 2.0), (5, 1.6))
    _loop_arrow(ax, (8.1, 1.2), (8.1, 5.9), 8.7, "next batch")
    _box(ax, 5, 0.25, "after each epoch: generate_and_print_sample()", 6.2, 0.45, color="#fde0dc", edge=HIGHLIGHT)
    _loop_arrow(ax, (1.9, 0.25), (1.9, 6.8), 1.2, "next epoch")
    fig.tight_layout()
    return fig


def plot_overfitting(steps, train_losses, val_losses, eval_freq: int) -> Figure:
    """Loss curves with the region after the best validation loss shaded: there the model overfits."""
    steps = np.asarray(steps)
    best = int(np.argmin(val_losses))
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(steps, train_losses, marker=".", color=TRAIN_COLOR, label="training loss")
    ax.plot(steps, val_losses, marker=".", linestyle="-.", color=VAL_COLOR, label="validation loss")
    ax.axvspan(steps[best], steps[-1] + eval_freq / 2, color=HIGHLIGHT, alpha=0.08)
    ax.axvline(steps[best], color=HIGHLIGHT, linewidth=0.8)
    ax.annotate(f"best validation loss {val_losses[best]:.2f}\n(step {steps[best]})", (steps[best], val_losses[best]),
                xytext=(0.3, 0.45), textcoords="axes fraction", fontsize=8, arrowprops={"arrowstyle": "->"})
    ymax = ax.get_ylim()[1]
    ax.text(steps[best] + 1, ymax * 0.93, "overfitting: training loss falls,\nvalidation loss does not",
            fontsize=8, color=HIGHLIGHT, va="top")
    gap = val_losses[-1] - train_losses[-1]
    ax.annotate("", (steps[-1], val_losses[-1]), (steps[-1], train_losses[-1]),
                arrowprops={"arrowstyle": "<->", "color": "#444444"})
    ax.text(steps[-1] - 1, (val_losses[-1] + train_losses[-1]) / 2, f"gap {gap:.1f}", ha="right", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


#####################################
# 5.3 Decoding strategies
#####################################

def plot_temperatures(words: list[str], logits, temperatures: list[float]) -> Figure:
    """The toy vocabulary's next-token distribution at several temperatures, one panel each."""
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float32)
    fig, axes = plt.subplots(1, len(temperatures), figsize=(4 * len(temperatures), 3), sharey=True)
    for ax, t in zip(axes, temperatures, strict=True):
        p = torch.softmax(logits / t, dim=0)
        entropy = -(p * p.clamp_min(1e-30).log()).sum().item()
        colors = [HIGHLIGHT if w == "pizza" else TRAIN_COLOR for w in words]
        ax.bar(range(len(words)), p.numpy(), color=colors)
        ax.set_xticks(range(len(words)), words, rotation=90, fontsize=8)
        ax.set_title(f"temperature {t}: perplexity {math.exp(entropy):.2f}", fontsize=9)
    axes[0].set_ylabel("probability of the next token")
    fig.tight_layout()
    return fig


def plot_sampled_vs_expected(words: list[str], probas, counts, n_draws: int, temperature: float) -> Figure:
    """How often each word was drawn, beside how often its probability says it should be."""
    x = np.arange(len(words))
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.bar(x - 0.2, np.asarray(probas) * n_draws, 0.4, color=MUTED, label="expected: probability x draws")
    ax.bar(x + 0.2, np.asarray(counts), 0.4, color=TRAIN_COLOR, label=f"drawn ({n_draws:,} draws)")
    ax.set_xticks(x, words, rotation=90, fontsize=8)
    ax.set_ylabel("count")
    ax.set_title(f"temperature {temperature}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_top_k(words: list[str], logits, k: int) -> Figure:
    """Top-k in three panels: the logits and the k-th largest, the masked logits, the probabilities."""
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float32)
    kth = torch.topk(logits, k).values[-1]
    keep = logits >= kth
    masked = torch.where(keep, logits, torch.tensor(-torch.inf))
    x = np.arange(len(words))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.1))
    axes[0].bar(x, logits.numpy(), color=[TRAIN_COLOR if k_ else MUTED for k_ in keep])
    axes[0].axhline(kth.item(), color=HIGHLIGHT, linestyle="--", label=f"{k}rd largest logit" if k == 3 else
                    f"k-th largest logit (k={k})")
    axes[0].set_title("1. logits; keep those >= the k-th largest", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].bar(x, torch.where(keep, logits, torch.zeros(())).numpy(), color=TRAIN_COLOR)
    for i in np.flatnonzero(~keep.numpy()):
        axes[1].text(i, 0, "-inf", ha="center", va="bottom", fontsize=7, color=HIGHLIGHT, rotation=90)
    axes[1].set_title("2. the others set to -inf", fontsize=9)
    axes[2].bar(x - 0.2, torch.softmax(logits, 0).numpy(), 0.4, color=MUTED, label="softmax of all logits")
    axes[2].bar(x + 0.2, torch.softmax(masked, 0).numpy(), 0.4, color=TRAIN_COLOR, label=f"after top-{k}")
    axes[2].set_title("3. softmax: -inf becomes probability 0", fontsize=9)
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(x, words, rotation=90, fontsize=8)
    fig.tight_layout()
    return fig


def plot_generate_step() -> Figure:
    """One step of `generate` as a flow chart, with where top-k, temperature and eos_id act."""
    fig, ax = _canvas(10, 4.4, (0, 12), (0, 6.2))
    chain = [
        (6, 5.6, "idx[:, -context_size:]   at most context_size tokens"),
        (6, 4.7, "logits = model(...)[:, -1, :]   only the last position"),
        (6, 3.8, "top_k?  logits below the k-th largest -> -inf"),
    ]
    for x, y, text in chain:
        _box(ax, x, y, text, 7.2, 0.55)
    for (_, y0, _), (_, y1, _) in zip(chain, chain[1:], strict=False):
        _arrow(ax, (6, y0 - 0.28), (6, y1 + 0.28))
    _box(ax, 3.2, 2.6, "temperature > 0:\nsoftmax(logits / temperature)\ntorch.multinomial: sample", 4.6, 0.95,
         color="#fff2e0", edge=VAL_COLOR)
    _box(ax, 8.8, 2.6, "temperature == 0:\nargmax (greedy)", 4.0, 0.95, color="#fff2e0", edge=VAL_COLOR)
    _arrow(ax, (5.0, 3.52), (3.6, 3.08))
    _arrow(ax, (7.0, 3.52), (8.4, 3.08))
    _box(ax, 6, 1.2, "next token == eos_id?  stop (the eos token is not appended)", 7.2, 0.55,
         color="#fde0dc", edge=HIGHLIGHT)
    _arrow(ax, (3.2, 2.12), (5.0, 1.48))
    _arrow(ax, (8.8, 2.12), (7.0, 1.48))
    _box(ax, 6, 0.3, "else: idx = cat(idx, next token), repeat up to max_new_tokens times", 7.2, 0.5)
    _arrow(ax, (6, 0.92), (6, 0.56))
    _loop_arrow(ax, (9.6, 0.3), (9.6, 5.6), 11.3, "next step")
    fig.tight_layout()
    return fig


#####################################
# 5.4 Saving and loading
#####################################

def _tensor_megabytes(obj) -> float:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() / 1e6
    if isinstance(obj, dict):
        return sum(_tensor_megabytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_megabytes(v) for v in obj)
    return 0.0


def checkpoint_parts(checkpoint: dict) -> dict[str, float]:
    """Megabytes of tensors in each part of a {"model_state_dict", "optimizer_state_dict"} checkpoint."""
    model_sd, opt_sd = checkpoint["model_state_dict"], checkpoint["optimizer_state_dict"]
    groups = {"tok_emb": "token embedding", "pos_emb": "position embedding", "out_head": "output head",
              "final_norm": "final LayerNorm"}
    parts: dict[str, float] = {}
    for name, tensor in model_sd.items():
        if name.endswith(".mask"):
            label = "causal masks (buffers)"
        else:
            label = groups.get(name.split(".")[0], "transformer blocks")
        parts[f"model: {label}"] = parts.get(f"model: {label}", 0.0) + _tensor_megabytes(tensor)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        parts[f"AdamW: {key}"] = sum(_tensor_megabytes(s.get(key)) for s in opt_sd["state"].values())
    return parts


def plot_checkpoint_contents(parts: dict[str, float]) -> Figure:
    """Stacked bars: what model.pth and model_and_optimizer.pth hold, in megabytes."""
    fig, ax = plt.subplots(figsize=(10, 2.6))
    cmap = plt.get_cmap("tab20c")
    model_parts = {k: v for k, v in parts.items() if k.startswith("model:")}
    rows = (("model.pth\n(state_dict)", model_parts), ("model_and_optimizer.pth", parts))
    for row, (_, contents) in enumerate(rows):
        left = 0.0
        for i, (name, mb) in enumerate(contents.items()):
            ax.barh(row, mb, left=left, color=cmap(i % 20), edgecolor="white",
                    label=f"{name} ({mb:,.1f} MB)" if row == 1 else None)
            left += mb
        ax.text(left, row, f" {left:,.0f} MB", va="center", fontsize=9)
    ax.set_yticks([0, 1], [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("megabytes of tensors")
    ax.set_xlim(0, sum(parts.values()) * 1.15)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.05), frameon=False)
    fig.tight_layout()
    return fig


#####################################
# 5.5 OpenAI's weights
#####################################

def plot_gpt2_sizes(counts: dict[str, dict]) -> Figure:
    """Parameters of the four GPT-2 sizes; `counts[name]` has `total`, `tied` and the config keys."""
    names = list(counts)
    fig, ax = plt.subplots(figsize=(8, 3))
    total = [counts[n]["total"] / 1e6 for n in names]
    tied = [counts[n]["tied"] / 1e6 for n in names]
    ax.bar(names, total, color=MUTED, label="our GPTModel (separate output head)")
    ax.bar(names, tied, color=TRAIN_COLOR, label="with the head sharing the token embedding (GPT-2's count)")
    for i, n in enumerate(names):
        c = counts[n]
        ax.text(i, total[i], f"{c['emb_dim']} dims, {c['n_layers']} layers,\n{c['n_heads']} heads",
                ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("parameters (millions)")
    ax.set_ylim(0, max(total) * 1.25)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plot_weight_name_map(rows: list[tuple[str, str, str]]) -> Figure:
    """OpenAI's parameter names (left) -> our GPTModel's modules (right), with the operation between."""
    n = len(rows)
    fig, ax = _canvas(12, 0.42 * n + 0.8, (0, 12), (-n + 0.3, 1.2))
    ax.text(2.2, 0.8, "OpenAI's params dict", ha="center", fontsize=10, weight="bold")
    ax.text(9.6, 0.8, "our GPTModel", ha="center", fontsize=10, weight="bold")
    for i, (theirs, op, ours) in enumerate(rows):
        y = -i
        _box(ax, 2.2, y, theirs, 4.2, 0.36, fontsize=8, family="monospace")
        _box(ax, 9.6, y, ours, 4.6, 0.36, color="#fde0dc", edge=HIGHLIGHT, fontsize=8, family="monospace")
        _arrow(ax, (4.35, y), (7.25, y), op, fontsize=7.5)
    fig.tight_layout()
    return fig


def plot_loss_comparison(ours: dict[str, float], published: dict[str, dict[str, float]]) -> Figure:
    """Training/validation loss on the-verdict: our model (measured) beside published GPT-2 numbers."""
    labels = ["our model (measured here)", *published]
    values = [ours, *published.values()]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(8, 3))
    for j, (split, color) in enumerate((("training", TRAIN_COLOR), ("validation", VAL_COLOR))):
        heights = [v[split] for v in values]
        bars = ax.bar(x + (j - 0.5) * 0.36, heights, 0.36, color=color, label=f"{split} loss")
        for i, bar in enumerate(bars):
            if i > 0:
                bar.set_hatch("//")
            ax.text(bar.get_x() + bar.get_width() / 2, heights[i], f"{heights[i]:.2f}", ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("cross-entropy loss")
    ax.set_ylim(0, max(max(v.values()) for v in values) * 1.2)
    ax.legend(fontsize=8)
    ax.set_title("hatched: numbers published by the course, not run here", fontsize=8)
    fig.tight_layout()
    return fig
