"""Search the pretraining hyperparameters of chapter 5's GPT model: grid, random search
or successive halving, resumable and in parallel.

    python hparam_search.py                        # the course's search: its 12,960-point grid, 124M model
    python hparam_search.py --estimate             # what that search would cost on this machine
    python hparam_search.py --preset laptop        # 16 random configurations of the same space, tiny model
    python hparam_search.py --strategy grid --space my_space.json --model tiny
    python hparam_search.py --preset laptop --strategy halving --n-trials 27 --budget-tokens 2000000

With no flags the script runs the course's search (`--preset course`): every point of
HPARAM_GRID, the course's model shape, the course's 95/5 split of the-verdict and its
training loop (`train_model`). `--preset laptop` picks settings a laptop can finish;
any flag given explicitly overrides its preset.

Every finished trial is appended as one JSON line to a ledger (--output-dir/ledger.jsonl)
under a hash of everything that determines its result (hyperparameters, model shape,
seed, data, token budget). Running the same command again skips the trials already in
the ledger, so a search that was killed loses at most the trials that were running.
At the end the script prints the best configurations and plots the validation loss
against each hyperparameter (--output-dir/val_loss_vs_hparams.png).

A search space is a JSON object that maps hyperparameter names to a list of values
(`{"peak_lr": [0.0005, 0.001], "batch_size": [4, 8]}`) or, for random search and
successive halving, to a distribution (`{"peak_lr": {"log_uniform": [1e-4, 5e-3]}}`,
also `uniform` and `int_uniform`). Hyperparameters it leaves out keep DEFAULT_HPARAMS.

The course's functions are here with the course's signatures: `train_model`,
`calc_loss_batch`, `calc_loss_loader`, `evaluate_model` and the grid `HPARAM_GRID`.
"""

import argparse
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from ch05_utils import (  # noqa: F401  (calc_loss_loader: the course's hparam_search defines it too)
    calc_loss_batch,
    calc_loss_loader,
    evaluate_model,
    get_device,
    read_text_file,
    set_seed,
    the_verdict_path,
)
from lr_schedule import apply_lr, clip_gradients, lr_at_step
from previous_chapters import GPT_CONFIG_124M, GPTDatasetV1, GPTModel, get_tokenizer
from torch.utils.data import DataLoader, TensorDataset

try:  # locks on the ledger and the output folder; not available on Windows, where they are skipped
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

# The course's grid (ch05/05_bonus_hparam_tuning/hparam_search.py in the book's repository): 12,960 runs.
HPARAM_GRID = {
    "batch_size": [2, 4, 8, 16],
    "drop_rate": [0.0, 0.1, 0.2],
    "warmup_iters": [10, 20, 30],
    "weight_decay": [0.1, 0.01, 0.0],
    "peak_lr": [0.0001, 0.0005, 0.001, 0.005],
    "initial_lr": [0.00005, 0.0001],
    "min_lr": [0.00005, 0.00001, 0.0001],
    "n_epochs": [5, 10, 15, 20, 25],
}
# What a hyperparameter that a space leaves out is fixed to (the chapter's training run).
DEFAULT_HPARAMS = {
    "batch_size": 2,
    "drop_rate": 0.1,
    "warmup_iters": 10,
    "weight_decay": 0.1,
    "peak_lr": 0.0004,
    "initial_lr": 0.00003,
    "min_lr": 0.000001,
    "n_epochs": 10,
}


@dataclass(frozen=True)
class HparamRule:
    """The values a hyperparameter may take: `low` <= value (< `high`, if given)."""
    integer: bool               # a whole number (batch size, steps, epochs)
    low: float                  # the smallest allowed value ...
    low_allowed: bool = True    # ... or, if False, the bound that values must exceed
    high: float | None = None   # values must stay below this (None: no upper bound)


HPARAM_RULES = {
    "batch_size": HparamRule(integer=True, low=1),
    "drop_rate": HparamRule(integer=False, low=0.0, high=1.0),
    "warmup_iters": HparamRule(integer=True, low=0),
    "weight_decay": HparamRule(integer=False, low=0.0),
    "peak_lr": HparamRule(integer=False, low=0.0, low_allowed=False),
    "initial_lr": HparamRule(integer=False, low=0.0),
    "min_lr": HparamRule(integer=False, low=0.0),
    "n_epochs": HparamRule(integer=True, low=1),
}
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
MODEL_PRESETS = {
    "tiny": {**GPT_CONFIG_124M, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2},
    "small": {**GPT_CONFIG_124M, "context_length": 64, "emb_dim": 128, "n_heads": 4, "n_layers": 2},
    "124M": GPT_CONFIG_124M,  # the course's model shape (context 256)
}
# The settings that --preset fills in when their flags are not given.
SEARCH_PRESETS = {
    # The course's search. Its 5% validation split of the-verdict is one 256-token window.
    "course": {"strategy": "grid", "model": "124M", "train_ratio": 0.95, "min_val_windows": 1},
    # A search a laptop's CPU finishes in about a quarter of an hour.
    "laptop": {"strategy": "random", "model": "tiny", "train_ratio": 0.9, "min_val_windows": 2},
}
# Part of every trial's ledger key. 2: the course's step counting (see `course_lr`) and its
# shuffling from torch's global generator; records of version 1 (steps counted from 0) are rerun.
TRIAL_PROTOCOL = 2
MAX_GRAD_NORM = 1.0
TRAIN_EVAL_WINDOWS = 32  # fixed training windows whose loss is reported as train_loss
EVAL_BATCH_SIZE = 8
MAX_LINE_VALUES = 8  # the plot joins the best loss per value for hyperparameters with at most this many values
LEDGER_NAME = "ledger.jsonl"
PLOT_NAME = "val_loss_vs_hparams.png"
LOCK_NAME = "hparam_search.lock"
PARENT_POLL_SECONDS = 0.5  # how often a worker checks that the search process still runs


class SpaceError(ValueError):
    """A search-space specification that cannot be searched."""


#####################################
# The course's training functions
#####################################

def course_lr(global_step: int, total_steps: int, peak_lr: float, warmup_iters: int, initial_lr: float,
              min_lr: float) -> float:
    """The learning rate of step `global_step` of the course's `train_model`, counted from 1.

    The course's loop raises the rate linearly from `initial_lr` and reaches the peak *at*
    step `warmup_iters`; then it decays along half a cosine to `min_lr` at the last step.
    That is `lr_at_step` (steps counted from 0, peak at step `warmup_steps`) evaluated at
    `global_step`. A run shorter than its warm-up stays on the rising line, as the course's
    does: the horizon passed to `lr_at_step` is then the end of warm-up, not of the run.
    """
    horizon = max(total_steps, warmup_iters + 1)
    return lr_at_step(global_step, horizon, peak_lr, warmup_iters, initial_lr, min_lr)


def train_steps(model: torch.nn.Module, train_loader, optimizer: torch.optim.Optimizer, device: torch.device,
                total_steps: int, warmup_iters: int, initial_lr: float, min_lr: float) -> tuple[int, int]:
    """Run `total_steps` optimizer steps over `train_loader`, epoch after epoch, the course's way.

    Each step sets the rate from `course_lr` (the peak is the optimizer's rate) and clips
    the gradients to norm 1 from step `warmup_iters` on. Both the course's `train_model`
    and this script's trials train with this loop. Returns (steps, tokens trained on).
    """
    peak_lr = optimizer.param_groups[0]["lr"]
    step = tokens = 0
    model.train()
    while step < total_steps:
        epoch_start = step
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            step += 1
            apply_lr(optimizer, course_lr(step, total_steps, peak_lr, warmup_iters, initial_lr, min_lr))
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            if step >= warmup_iters:
                clip_gradients(model, MAX_GRAD_NORM)
            optimizer.step()
            tokens += input_batch.numel()
            if step == total_steps:
                break
        if step == epoch_start:
            raise ValueError("The training loader gave no batch: there is nothing to train on.")
    return step, tokens


def train_model(model: torch.nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer,
                device: torch.device | str, n_epochs: int, eval_iter: int, warmup_iters: int = 10,
                initial_lr: float = 3e-05, min_lr: float = 1e-6) -> tuple[float, float]:
    """The course's `train_model`: `n_epochs` epochs with linear warm-up, cosine decay and
    gradient clipping, then (train_loss, val_loss) over the first `eval_iter` batches.

    The peak learning rate is the optimizer's. The steps are this script's own trial loop
    (`train_steps`), so the book's call and the command line train identically.
    """
    train_steps(model, train_loader, optimizer, device, len(train_loader) * n_epochs, warmup_iters,
                initial_lr, min_lr)
    return evaluate_model(model, train_loader, val_loader, device, eval_iter)


#####################################
# Search spaces
#####################################

def load_space(spec: str) -> dict:
    """'course' (the book's grid) or the path of a JSON file with a search space."""
    if spec == "course":
        return dict(HPARAM_GRID)
    path = Path(spec)
    if not path.is_file():
        raise SpaceError(f"--space {spec!r} is neither 'course' nor an existing JSON file.")
    try:
        space = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpaceError(f"{path} is not valid JSON ({err}).") from None
    return space


def _check_value(name: str, value) -> None:
    rule = HPARAM_RULES[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpaceError(f"{name}: {value!r} is not a number.")
    if not math.isfinite(value):
        raise SpaceError(f"{name} must be a finite number, got {value!r}.")
    if rule.integer and not float(value).is_integer():
        raise SpaceError(f"{name} must be a whole number, got {value!r}.")
    too_low = value < rule.low or (value == rule.low and not rule.low_allowed)
    if too_low or (rule.high is not None and value >= rule.high):
        upper = f" and < {rule.high}" if rule.high is not None else ""
        bound = f"{'>=' if rule.low_allowed else '>'} {rule.low}{upper}"
        raise SpaceError(f"{name} must be {bound}, got {value!r}.")


def _normal_distribution(name: str, values: dict, strategy: str) -> dict:
    """A distribution entry of a space, checked: {kind: [low, high]}."""
    if strategy == "grid":
        raise SpaceError(f"{name}: grid search needs a list of values, not a distribution "
                         f"({values}); list the values or use --strategy random or halving.")
    if len(values) != 1 or next(iter(values)) not in DISTRIBUTIONS:
        raise SpaceError(f"{name}: a distribution is one of {{\"{'|'.join(DISTRIBUTIONS)}\": [low, high]}}, "
                         f"got {values}.")
    kind, bounds = next(iter(values.items()))
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise SpaceError(f"{name}: {kind} needs [low, high], got {bounds!r}.")
    for bound in bounds:
        _check_value(name, bound)
    if bounds[0] > bounds[1]:
        raise SpaceError(f"{name}: {kind} bounds are reversed ({bounds[0]} > {bounds[1]}).")
    if kind == "log_uniform" and bounds[0] <= 0:
        raise SpaceError(f"{name}: log_uniform needs a positive lower bound, got {bounds[0]}.")
    if HPARAM_RULES[name].integer and kind != "int_uniform":
        raise SpaceError(f"{name} is a whole number: use int_uniform or a list, not {kind}.")
    if kind == "int_uniform" and not HPARAM_RULES[name].integer:
        raise SpaceError(f"{name} is not a whole number: use uniform or log_uniform, not int_uniform.")
    return {kind: list(bounds)}


def validate_space(space, strategy: str) -> dict:
    """Check a space and return it in a normal form: every hyperparameter maps to a
    non-empty list of values or to a one-entry distribution dict.

    The messages name the offending hyperparameter and what would fix it, because a
    search that fails on trial 4,000 of 12,960 wastes hours.
    """
    if not isinstance(space, dict) or not space:
        raise SpaceError("A search space must be a non-empty JSON object that maps hyperparameter names to values.")
    unknown = sorted(set(space) - set(HPARAM_RULES))
    if unknown:
        raise SpaceError(f"Unknown hyperparameter(s) {unknown}; a space may use {sorted(HPARAM_RULES)}.")
    normal = {}
    for name, values in space.items():
        if isinstance(values, dict):
            normal[name] = _normal_distribution(name, values, strategy)
            continue
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SpaceError(f"{name}: the list of values is empty; give at least one value or leave it out.")
        for value in values:
            _check_value(name, value)
        if len(set(values)) != len(values):
            raise SpaceError(f"{name}: the values {values} repeat; each configuration would run twice.")
        normal[name] = [int(v) if HPARAM_RULES[name].integer else v for v in values]
    return normal


def grid_size(space: dict) -> int:
    return math.prod(len(values) for values in space.values())


def complete(hparams: dict) -> dict:
    """A configuration with every hyperparameter: the space's values over the defaults."""
    return {**DEFAULT_HPARAMS, **hparams}


def grid_configs(space: dict) -> list[dict]:
    """Every combination of the space's values, in the order of itertools.product."""
    names = list(space)
    return [complete(dict(zip(names, combo, strict=True))) for combo in itertools.product(*space.values())]


def _sample(values, rng: random.Random):
    if isinstance(values, list):
        return rng.choice(values)
    kind, (low, high) = next(iter(values.items()))
    if kind == "int_uniform":
        return rng.randint(int(low), int(high))
    value = math.exp(rng.uniform(math.log(low), math.log(high))) if kind == "log_uniform" else rng.uniform(low, high)
    return float(f"{value:.3g}")  # 3 significant digits: readable in the ledger and stable in the hash


def sample_configs(space: dict, n: int, seed: int) -> list[dict]:
    """`n` distinct configurations drawn from the space (fewer if the space has fewer)."""
    rng = random.Random(seed)
    finite = all(isinstance(v, list) for v in space.values())
    if finite and grid_size(space) <= n:
        return grid_configs(space)
    configs, seen = [], set()
    for _ in range(100 * n):
        config = complete({name: _sample(values, rng) for name, values in space.items()})
        marker = json.dumps(config, sort_keys=True)
        if marker not in seen:
            seen.add(marker)
            configs.append(config)
            if len(configs) == n:
                break
    return configs


def check_lr_order(configs: list[dict]) -> None:
    """The schedule warms up from initial_lr and decays to min_lr, so neither may exceed peak_lr."""
    bad = [c for c in configs if c["initial_lr"] > c["peak_lr"] or c["min_lr"] > c["peak_lr"]]
    if bad:
        example = {k: bad[0][k] for k in ("initial_lr", "peak_lr", "min_lr")}
        raise SpaceError(f"{len(bad)} of {len(configs)} configurations have initial_lr or min_lr above peak_lr "
                         f"(e.g. {example}); narrow the ranges so that peak_lr is the largest.")


#####################################
# Successive halving
#####################################

def halving_rungs(n_configs: int, budget_tokens: int, eta: int) -> list[tuple[int, int]]:
    """(configurations, training tokens per configuration) for each rung.

    Successive halving (Jamieson & Talwalkar, 2016) gives every rung the same share of
    the budget: many configurations get a few tokens each, then the best 1/eta of them
    get eta times as many, until one configuration is left.
    """
    if eta < 2:
        raise ValueError(f"--eta must be at least 2, got {eta}.")
    counts = [n_configs]
    while counts[-1] > 1:
        counts.append(max(1, counts[-1] // eta))
    counts = counts[:-1] or [n_configs]
    return [(count, budget_tokens // (len(counts) * count)) for count in counts]


def successive_halving(configs: Sequence[dict], budget_tokens: int, eta: int,
                       run_rung: Callable[[list[dict], int, int], list[float | None] | None]) -> list[dict]:
    """Run the rungs of successive halving and return what each one did.

    `run_rung(configs, tokens_per_config, rung)` trains every configuration with that
    many tokens and returns their validation losses (None for a diverged trial), or
    None if the search's time ran out. Each rung promotes the `eta`-fold fewer
    configurations with the lowest loss; ties keep the earlier configuration.
    """
    rungs = halving_rungs(len(configs), budget_tokens, eta)
    survivors, history = list(configs), []
    for rung, (_, tokens) in enumerate(rungs):
        losses = run_rung(survivors, tokens, rung)
        if losses is None:
            break
        order = sorted(range(len(survivors)), key=lambda i: _sort_loss(losses[i]))
        keep = rungs[rung + 1][0] if rung + 1 < len(rungs) else 1
        promoted = [survivors[i] for i in order[:keep]]
        history.append({"rung": rung, "tokens": tokens, "configs": survivors, "losses": losses,
                        "promoted": promoted})
        survivors = promoted
    return history


def _sort_loss(loss: float | None) -> float:
    return math.inf if loss is None or not math.isfinite(loss) else loss


#####################################
# Data and one trial
#####################################

@dataclass
class SearchData:
    """Token windows cut once, before the search, and shared by every trial.

    The validation windows are the same for every trial, so the losses compare.
    """
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    val_inputs: torch.Tensor
    val_targets: torch.Tensor
    fingerprint: str  # hash of the text and the split: part of every trial's key


def prepare_data(text: str, context_length: int, train_ratio: float, min_val_windows: int = 2,
                 train_windows: int | None = None) -> SearchData:
    """Split `text` like the chapter does (by characters at `train_ratio`) and cut each
    part into non-overlapping windows of `context_length` tokens, as the course's
    `create_dataloader_v1(..., stride=context_length)` does.

    `train_windows` keeps only the first that many training windows: every epoch, and
    so every trial, gets cheaper, at the price of ranking on less data.
    """
    if not 0 < train_ratio < 1:
        raise ValueError(f"--train-ratio must be between 0 and 1, got {train_ratio}.")
    split = int(train_ratio * len(text))
    tokenizer = get_tokenizer()
    parts = []
    for part in (text[:split], text[split:]):
        dataset = GPTDatasetV1(part, tokenizer, context_length, context_length)
        if len(dataset) == 0:
            parts.append((torch.empty(0, context_length, dtype=torch.long),) * 2)
        else:
            parts.append((torch.stack(dataset.input_ids), torch.stack(dataset.target_ids)))
    if train_windows is not None:
        parts[0] = (parts[0][0][:train_windows], parts[0][1][:train_windows])
    n_val = len(parts[1][0])
    if n_val < min_val_windows:
        raise ValueError(
            f"The validation split holds {n_val} window(s) of {context_length} tokens, fewer than "
            f"{min_val_windows} (--min-val-windows). Use a longer text, a smaller --train-ratio or a model "
            "with a shorter context."
        )
    fingerprint = hashlib.sha256(f"{train_ratio}|{context_length}|{train_windows}|{text}".encode()).hexdigest()[:16]
    return SearchData(*parts[0], *parts[1], fingerprint)


@dataclass(frozen=True)
class Trial:
    """One training run: everything that determines its result, and so its ledger key."""
    hparams: dict
    model: str
    seed: int
    data: str
    max_tokens: int | None = None  # None: train hparams["n_epochs"] epochs; else this many tokens
    strategy: str = "grid"
    rung: int | None = None

    @property
    def key(self) -> str:
        hparams = dict(self.hparams)
        if self.max_tokens is not None:
            hparams.pop("n_epochs", None)  # the token budget replaces the number of epochs
        identity = {"hparams": hparams, "model": MODEL_PRESETS[self.model], "seed": self.seed,
                    "data": self.data, "max_tokens": self.max_tokens, "protocol": TRIAL_PROTOCOL}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.max_tokens is None:
            return self.hparams["n_epochs"] * steps_per_epoch
        tokens_per_step = self.hparams["batch_size"] * MODEL_PRESETS[self.model]["context_length"]
        return max(1, self.max_tokens // tokens_per_step)


def mean_window_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                     device: torch.device) -> float:
    """Loss averaged over every token of every window (not over batches, which may differ in size)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(inputs), EVAL_BATCH_SIZE):
            batch = slice(start, start + EVAL_BATCH_SIZE)
            total += calc_loss_batch(inputs[batch], targets[batch], model, device).item() * len(inputs[batch])
    model.train()
    return total / len(inputs)


def run_trial(trial: Trial, data: SearchData, device: torch.device) -> dict:
    """Train a fresh model with the trial's hyperparameters and return its ledger record.

    The set-up is the course's: seed, model, AdamW at the peak rate, a loader that
    shuffles from torch's global generator, and the course's loop (`train_steps`). The
    losses are measured on fixed windows: `val_loss` on every validation window (the
    course's `eval_iter=1` measures the first validation batch, which at the course's
    split is the whole validation set) and `train_loss` on the first training windows
    (the course's, on one random training batch, varies from trial to trial).
    """
    hp = trial.hparams
    set_seed(trial.seed)
    model = GPTModel({**MODEL_PRESETS[trial.model], "drop_rate": hp["drop_rate"]}).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["peak_lr"], weight_decay=hp["weight_decay"])
    loader = DataLoader(TensorDataset(data.train_inputs, data.train_targets), batch_size=hp["batch_size"],
                        shuffle=True, drop_last=True)
    start = time.perf_counter()
    steps, tokens = train_steps(model, loader, optimizer, device, trial.total_steps(len(loader)),
                                hp["warmup_iters"], hp["initial_lr"], hp["min_lr"])
    train_seconds = time.perf_counter() - start
    n_train = min(TRAIN_EVAL_WINDOWS, len(data.train_inputs))
    train_loss = mean_window_loss(model, data.train_inputs[:n_train], data.train_targets[:n_train], device)
    val_loss = mean_window_loss(model, data.val_inputs, data.val_targets, device)
    seconds = time.perf_counter() - start
    finite = math.isfinite(train_loss) and math.isfinite(val_loss)
    return {
        "key": trial.key, "strategy": trial.strategy, "rung": trial.rung, "hparams": hp,
        "model": trial.model, "seed": trial.seed, "data": trial.data, "max_tokens": trial.max_tokens,
        "steps": steps, "warmup_steps": min(hp["warmup_iters"], steps), "tokens": tokens,
        "train_loss": train_loss if finite else None, "val_loss": val_loss if finite else None,
        "diverged": not finite, "val_windows": len(data.val_inputs), "seconds": round(seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "device": str(device), "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


#####################################
# The ledger and the lock on the output folder
#####################################

class LedgerError(ValueError):
    """A ledger line that parses as JSON but is not a trial record."""


# What every record must hold, and of which type: what resuming, budgets, the table and the plot read.
RECORD_FIELDS = {"key": (str,), "hparams": (dict,), "val_loss": (int, float, type(None)),
                 "train_loss": (int, float, type(None)), "tokens": (int,), "seconds": (int, float)}


def record_problem(record) -> str | None:
    """Why `record` (a parsed ledger line) is not a trial record, or None if it is one."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for name, types in RECORD_FIELDS.items():
        if name not in record:
            return f"no {name!r} field"
        if isinstance(record[name], bool) or not isinstance(record[name], types):
            return f"{name!r} is {record[name]!r}"
    bad = [n for n, v in record["hparams"].items() if isinstance(v, bool) or not isinstance(v, int | float)]
    return f"hyperparameter {bad[0]!r} is not a number" if bad else None


class Ledger:
    """An append-only JSON-lines file of finished trials.

    Each record is written with one `write` call on a file opened for appending,
    under an exclusive lock, and flushed to disk: a line is either all there or, after
    a crash of the machine mid-write, an unparsable fragment that `records` skips.
    A line that parses but is not a record means the file is not (only) a ledger of
    this script, and is refused rather than guessed at.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records, broken = [], 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    broken += 1
                    continue
                problem = record_problem(record)
                if problem:
                    raise LedgerError(f"{self.path} line {number} is not a trial record of hparam_search.py "
                                      f"({problem}); remove that line or use another --output-dir.")
                records.append(record)
        if broken:
            print(f"warning: skipped {broken} unreadable line(s) in {self.path} (left by a crash mid-write); "
                  "those trials will rerun.", file=sys.stderr)
        return records

    def completed(self) -> dict[str, dict]:
        """The first record of every trial key (a trial recorded twice counts once)."""
        done = {}
        for record in self.records():
            done.setdefault(record["key"], record)
        return done

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True).encode() + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        line = b"\n" + line  # end a fragment left by a crash, so this record stays whole
            written = os.write(fd, line)
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)


class FolderLock:
    """An exclusive lock on an output folder, held while a search runs there.

    The lock is an `flock` on a file in the folder, so the operating system releases
    it when the process ends in any way (even `kill -9`): a stale lock cannot block the
    next run. The file names the process that holds it, for the message a second
    search prints. On a clean exit the file is removed again.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover (Windows: no flock; searches are not guarded)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ValueError(f"{self.path.parent} is in use by another search ({holder}); wait for it to "
                                 "finish or stop it, or use another --output-dir.") from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder removed the file between our open and lock: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {datetime.now(UTC).isoformat(timespec='seconds')}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


#####################################
# Running trials, in parallel and within a budget
#####################################

_WORKER: dict = {}


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker as soon as the search process that started it is gone.

    A worker waits for its next trial on a pipe that its sibling workers also hold open,
    so it would never notice a parent killed with `kill -9` and would wait forever. A
    daemon thread checks every PARENT_POLL_SECONDS whether the parent changed (an orphan
    is adopted by another process) and then ends the process at once, mid-trial or not.
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(data: SearchData, device: str, threads: int, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the search process's to handle: it stops us
    _exit_with_parent(parent_pid)
    torch.set_num_threads(threads)
    _WORKER.update(data=data, device=torch.device(device))


def _run_in_worker(trial: Trial) -> dict:
    return run_trial(trial, _WORKER["data"], _WORKER["device"])


def _stop_workers() -> None:
    """Terminate the worker processes now, instead of waiting for their trials to end."""
    for process in multiprocessing.active_children():
        process.terminate()
    for process in multiprocessing.active_children():
        process.join(timeout=10)


@dataclass
class Budget:
    """Stop starting trials once the search's finished trials used this much (None: no limit).

    Seconds are the trials' own times (training and evaluation) as recorded in the ledger, so a resumed
    search counts what it spent before; with --workers N the wall-clock time is about
    seconds / N.
    """
    tokens: int | None = None
    seconds: float | None = None

    def exhausted(self, spent: dict[str, dict]) -> bool:
        if self.tokens is not None and sum(r["tokens"] for r in spent.values()) >= self.tokens:
            return True
        return self.seconds is not None and sum(r["seconds"] for r in spent.values()) >= self.seconds


def _run_parallel(pending: list[Trial], finish: Callable[[dict], None], data: SearchData, device: torch.device,
                  workers: int, budget: Budget, spent: dict[str, dict]) -> None:
    """Hand the trials to `workers` processes; `finish` each record as it arrives.

    On any exception here (Ctrl-C, SIGTERM, a failed trial) the workers are terminated
    before the pool shuts down, so nothing waits for a trial whose result is unwanted.
    """
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(data, str(device), threads, os.getpid()))
    try:
        running = set()
        while pending or running:
            while pending and len(running) < workers and not budget.exhausted(spent):
                running.add(pool.submit(_run_in_worker, pending.pop()))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                finish(future.result())
    except BaseException:
        _stop_workers()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def execute(trials: list[Trial], ledger: Ledger, data: SearchData, device: torch.device, workers: int,
            budget: Budget, spent: dict[str, dict], show_progress: bool = True) -> dict[str, dict] | None:
    """Run the trials that the ledger lacks; return the records of all `trials`, or None
    if the budget stopped the search before every trial had run.

    `spent` maps the keys of the search's trials so far to their records, which count
    against the budget; the trials found in the ledger and the new ones are added to
    it. Only this process writes the ledger, so parallel workers never interleave lines.
    """
    from tqdm.auto import tqdm

    done = ledger.completed()
    results = {t.key: done[t.key] for t in trials if t.key in done}
    todo = list({t.key: t for t in trials if t.key not in results}.values())  # each key runs once
    spent.update(results)
    print(f"{len(trials)} trial(s): {len(results)} already in {ledger.path}, {len(todo)} to run.")
    if not todo:
        return results
    bar = tqdm(total=len(todo), desc="Trials", disable=not show_progress)

    def finish(record: dict) -> None:
        ledger.append(record)
        results[record["key"]] = record
        spent[record["key"]] = record
        bar.update()
        bar.set_postfix(best_val=min((_sort_loss(r["val_loss"]) for r in results.values()), default=math.inf))

    pending = list(reversed(todo))
    try:
        if workers == 1:
            while pending and not budget.exhausted(spent):
                finish(run_trial(pending.pop(), data, device))
        else:
            _run_parallel(pending, finish, data, device, workers, budget, spent)
    finally:
        bar.close()
    if len(results) < len({t.key for t in trials}):
        print(f"Budget used up after {len(results)} of {len(trials)} trial(s); raise it and rerun to continue.")
        return None
    return results


#####################################
# Summary and plot
#####################################

def varying_hparams(records: list[dict]) -> list[str]:
    return [name for name in HPARAM_RULES if len({r["hparams"].get(name) for r in records}) > 1]


def summary_table(records: list[dict], top_k: int) -> str:
    """The `top_k` records with the lowest validation loss, as an aligned text table."""
    ranked = sorted(records, key=lambda r: _sort_loss(r["val_loss"]))[:top_k]
    budgeted = all(r.get("max_tokens") is not None for r in ranked)  # halving: tokens, not epochs, set the length
    names = [n for n in HPARAM_RULES if not (budgeted and n == "n_epochs")]
    header = ["rank", "val_loss", "train_loss", "tokens", "seconds", *names]
    rows = [[str(i + 1), _fmt(r["val_loss"]), _fmt(r["train_loss"]), f"{r['tokens']:,}", f"{r['seconds']:.1f}",
             *(f"{r['hparams'][n]:g}" if n in r["hparams"] else "-" for n in names)] for i, r in enumerate(ranked)]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows])


def _fmt(loss: float | None) -> str:
    return "diverged" if loss is None else f"{loss:.3f}"


def plot_val_loss(records: list[dict], path: str | Path) -> Path:
    """One panel per hyperparameter: every trial's validation loss at its value and, for
    a hyperparameter with a few values, the best loss reached at each (the line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    names = varying_hparams(records) or list(HPARAM_RULES)[:1]
    ok = [r for r in records if r["val_loss"] is not None]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    tokens = [r["tokens"] for r in ok]
    for ax, name in zip(axes.flat, names, strict=False):
        xs = [r["hparams"][name] for r in ok]
        ys = [r["val_loss"] for r in ok]
        points = ax.scatter(xs, ys, c=tokens, s=14, alpha=0.7, cmap="viridis")
        best = {}
        for x, y in zip(xs, ys, strict=True):
            best[x] = min(y, best.get(x, math.inf))
        if len(best) <= MAX_LINE_VALUES:  # a continuous range: every point is its own value, no line
            ax.plot(sorted(best), [best[x] for x in sorted(best)], color="tab:red", lw=1)
        positive = [x for x in xs if x > 0]
        if positive and len(positive) == len(xs) and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(name)
    for ax in axes[:, 0]:
        ax.set_ylabel("validation loss")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if len(set(tokens)) > 1:  # successive halving: colour tells the rungs apart
        fig.colorbar(points, ax=axes, label="training tokens", shrink=0.8)
    fig.suptitle(f"Validation loss of {len(ok)} trial(s)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")  # written beside, then renamed: never half a PNG
    fig.savefig(partial, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(partial, path)
    return path


#####################################
# Cost estimate
#####################################

def estimate_cost(configs: list[dict], data: SearchData, model: str, device: torch.device, seed: int,
                  timing_steps: int = 5) -> dict:
    """Time a few steps at every batch size in `configs` and project the full cost.

    A trial costs its steps x the time per step, plus one evaluation, and its steps
    follow from batch size and epochs; so timing each batch size once prices every
    configuration. A one-step trial first warms PyTorch up, which would otherwise
    inflate the first timing.
    """
    ctx = MODEL_PRESETS[model]["context_length"]
    warm_up = complete({"batch_size": 1, "warmup_iters": 0})
    run_trial(Trial(warm_up, model, seed, data.fingerprint, max_tokens=ctx), data, device)
    per_step, eval_seconds = {}, []
    for batch_size in sorted({c["batch_size"] for c in configs}):
        hparams = complete({"batch_size": batch_size, "warmup_iters": 0})
        record = run_trial(Trial(hparams, model, seed, data.fingerprint,
                                 max_tokens=timing_steps * batch_size * ctx), data, device)
        per_step[batch_size] = record["train_seconds"] / record["steps"]
        eval_seconds.append(record["seconds"] - record["train_seconds"])
    steps_per_epoch = {b: len(data.train_inputs) // b for b in per_step}
    evaluation = sum(eval_seconds) / len(eval_seconds)
    seconds = sum(c["n_epochs"] * steps_per_epoch[c["batch_size"]] * per_step[c["batch_size"]] + evaluation
                  for c in configs)
    return {"trials": len(configs), "seconds_per_step": per_step, "steps_per_epoch": steps_per_epoch,
            "eval_seconds": evaluation, "total_seconds": seconds, "mean_seconds_per_trial": seconds / len(configs)}


#####################################
# Command line
#####################################

class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: stop the workers, keep the ledger, exit."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Search pretraining hyperparameters (grid, random search or successive halving); "
                    "resumable from a JSON-lines ledger. Without flags: the course's grid search.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", choices=list(SEARCH_PRESETS), default="course",
                        help="Defaults for --strategy, --model, --train-ratio and --min-val-windows: 'course' "
                             "(grid, 124M, 0.95, 1: the course's search) or 'laptop' (random, tiny, 0.9, 2).")
    parser.add_argument("--space", default="course",
                        help="'course' (the book's 12,960-point HPARAM_GRID) or a JSON file with a search space.")
    parser.add_argument("--strategy", choices=["grid", "random", "halving"], default=argparse.SUPPRESS,
                        help="grid: every combination; random: --n-trials samples; halving: successive "
                             "halving of --n-trials samples within --budget-tokens. Default: from --preset.")
    parser.add_argument("--n-trials", type=int, default=16, help="Configurations drawn for random and halving.")
    parser.add_argument("--eta", type=int, default=3, help="Halving keeps the best 1/eta of each rung.")
    parser.add_argument("--budget-tokens", type=int, default=None,
                        help="Training tokens for the whole search (required for halving; grid and random "
                             "stop starting trials once spent).")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="Summed trial time after which no new trial starts.")
    parser.add_argument("--model", choices=list(MODEL_PRESETS), default=argparse.SUPPRESS,
                        help="Model shape of every trial (124M is the course's). Default: from --preset.")
    parser.add_argument("--text-file", type=Path, default=None,
                        help="UTF-8 training text. Default: the-verdict.txt (from $CH05_DATA_DIR if set, "
                             "else downloaded once and checked against its SHA-256).")
    parser.add_argument("--train-ratio", type=float, default=argparse.SUPPRESS,
                        help="Share of the text used for training. Default: from --preset.")
    parser.add_argument("--train-windows", type=int, default=None,
                        help="Train on only the first N windows of the training split (cheaper trials).")
    parser.add_argument("--min-val-windows", type=int, default=argparse.SUPPRESS,
                        help="Refuse a validation split with fewer windows than this. Default: from --preset.")
    parser.add_argument("--seed", type=int, default=123, help="Seeds every trial, and the random sampling.")
    parser.add_argument("--workers", type=int, default=1, help="Trials run in parallel processes.")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps.")
    parser.add_argument("--output-dir", type=Path, default=Path("output"),
                        help=f"Holds {LEDGER_NAME} and {PLOT_NAME}.")
    parser.add_argument("--top-k", type=int, default=5, help="Rows of the summary table.")
    parser.add_argument("--estimate", action="store_true",
                        help="Only time a few steps per batch size and print what the search would cost.")
    parser.add_argument("--estimate-steps", type=int, default=5, help="Steps timed per batch size by --estimate.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with the ones not given filled in from --preset."""
    args = build_parser().parse_args(argv)
    for name, value in SEARCH_PRESETS[args.preset].items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers before any work, naming the flag."""
    for name in ("n_trials", "top_k", "min_val_windows", "estimate_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    cores = os.cpu_count() or 1
    if not 1 <= args.workers <= cores:
        raise ValueError(f"--workers must be between 1 and the number of CPU cores here ({cores}), "
                         f"got {args.workers}.")
    if not (math.isfinite(args.train_ratio) and 0 < args.train_ratio < 1):
        raise ValueError(f"--train-ratio must be between 0 and 1, got {args.train_ratio}.")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}.")
    if args.eta < 2:
        raise ValueError(f"--eta must be at least 2, got {args.eta}.")
    if args.train_windows is not None and args.train_windows < 1:
        raise ValueError(f"--train-windows must be at least 1, got {args.train_windows}.")
    if args.budget_tokens is not None and args.budget_tokens < 1:
        raise ValueError(f"--budget-tokens must be positive, got {args.budget_tokens}.")
    if args.budget_seconds is not None and not (math.isfinite(args.budget_seconds) and args.budget_seconds > 0):
        raise ValueError(f"--budget-seconds must be a positive number (leave it out for no limit), "
                         f"got {args.budget_seconds}.")
    if args.strategy == "halving" and args.budget_tokens is None:
        raise ValueError("--strategy halving needs --budget-tokens: the rungs split that budget.")


def make_configs(args: argparse.Namespace, space: dict) -> list[dict]:
    if args.strategy == "halving" and "n_epochs" in space:
        print("Note: successive halving sets each trial's length from --budget-tokens; n_epochs is ignored.")
        space = {name: values for name, values in space.items() if name != "n_epochs"}
    if args.strategy == "grid":
        configs = grid_configs(space)
    else:
        configs = sample_configs(space, args.n_trials, args.seed)
    check_lr_order(configs)
    if args.strategy == "halving":
        configs = [{k: v for k, v in c.items() if k != "n_epochs"} for c in configs]
    return configs


def check_batch_sizes(configs: list[dict], data: SearchData) -> None:
    largest = max(c["batch_size"] for c in configs)
    if largest > len(data.train_inputs):
        raise SpaceError(f"batch_size {largest} needs {largest} training windows but the training split has "
                         f"{len(data.train_inputs)}; use smaller batch sizes, a longer text or more --train-windows.")


def prepare_search(args: argparse.Namespace) -> tuple[dict, list[dict], torch.device, SearchData]:
    """Everything a search needs before its first trial, each step checking its input."""
    check_args(args)
    space = validate_space(load_space(args.space), args.strategy)
    configs = make_configs(args, space)
    device = get_device(args.device)
    text = read_text_file(args.text_file or the_verdict_path())
    data = prepare_data(text, MODEL_PRESETS[args.model]["context_length"], args.train_ratio,
                        args.min_val_windows, args.train_windows)
    check_batch_sizes(configs, data)
    return space, configs, device, data


def print_estimate(args: argparse.Namespace, configs: list[dict], data: SearchData, device: torch.device) -> None:
    cost = estimate_cost(configs, data, args.model, device, args.seed, args.estimate_steps)
    for batch_size, seconds in cost["seconds_per_step"].items():
        print(f"  batch_size {batch_size:>3}: {seconds * 1000:.1f} ms/step, "
              f"{cost['steps_per_epoch'][batch_size]} steps/epoch")
    print(f"  evaluation: {cost['eval_seconds']:.1f} s per trial")
    print(f"Estimated cost: {cost['trials']:,} trials x {cost['mean_seconds_per_trial']:.1f} s on average = "
          f"{cost['total_seconds'] / 3600:.1f} hours on one process ({device}).")


def run_halving(args: argparse.Namespace, configs: list[dict], data: SearchData, device: torch.device,
                ledger: Ledger, budget: Budget, spent: dict[str, dict]) -> list[dict]:
    """Successive halving; returns the records of the last rung that finished (all rungs go into `spent`)."""
    rungs = halving_rungs(len(configs), args.budget_tokens, args.eta)
    ctx = MODEL_PRESETS[args.model]["context_length"]
    smallest = rungs[0][1] // (max(c["batch_size"] for c in configs) * ctx)
    if smallest < 1:
        raise SpaceError(f"--budget-tokens {args.budget_tokens:,} gives each of the {len(configs)} first-rung "
                         f"trials {rungs[0][1]:,} tokens, less than one batch; raise the budget or lower --n-trials.")
    print("Successive halving: " + ", then ".join(f"{n} trial(s) x {t:,} tokens" for n, t in rungs))
    last: list[dict] = []

    def run_rung(survivors: list[dict], tokens: int, rung: int) -> list[float | None] | None:
        nonlocal last
        trials = [Trial(c, args.model, args.seed, data.fingerprint, tokens, "halving", rung) for c in survivors]
        results = execute(trials, ledger, data, device, args.workers, budget, spent, not args.no_progress)
        if results is None:
            return None
        last = [results[t.key] for t in trials]
        return [r["val_loss"] for r in last]

    history = successive_halving(configs, args.budget_tokens, args.eta, run_rung)
    for entry in history:
        best = min(_sort_loss(v) for v in entry["losses"])
        print(f"Rung {entry['rung']}: {len(entry['configs'])} trial(s) x {entry['tokens']:,} tokens, "
              f"best val loss {best:.3f}, promoted {len(entry['promoted'])}.")
    return last


def print_best(records: list[dict], top_k: int, which: str = "") -> None:
    """The course's closing lines (best hyperparameters and losses), then our table."""
    best = min(records, key=lambda r: _sort_loss(r["val_loss"]))
    print(f"Best hyperparameters: {best['hparams']}")
    print(f"Best Val loss: {best['val_loss']} | Training loss {best['train_loss']}")
    print(f"\nBest of {len(records)} trial(s) {which}by validation loss:")
    print(summary_table(records, top_k))


def run_search(args: argparse.Namespace, configs: list[dict], data: SearchData, device: torch.device) -> int:
    """Run the trials the ledger lacks, then report; returns the exit code."""
    ledger = Ledger(args.output_dir / LEDGER_NAME)
    budget = Budget(args.budget_tokens if args.strategy != "halving" else None, args.budget_seconds)
    spent: dict[str, dict] = {}
    start = time.perf_counter()
    try:
        if args.strategy == "halving":
            records = run_halving(args, configs, data, device, ledger, budget, spent)
        else:
            trials = [Trial(c, args.model, args.seed, data.fingerprint, strategy=args.strategy) for c in configs]
            execute(trials, ledger, data, device, args.workers, budget, spent, not args.no_progress)
            records = list(spent.values())
    except KeyboardInterrupt as stop:
        what = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
        print(f"\nStopped by {what}. The finished trials are in {ledger.path}: run the same command to continue.")
        if spent:
            print_best(list(spent.values()), args.top_k)
        return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    except BrokenProcessPool:
        print(f"error: a worker process died (out of memory?); the finished trials are in {ledger.path}. "
              "Rerun with fewer --workers.", file=sys.stderr)
        return 1
    except ValueError as err:  # a ledger that is not ours, the schedule rejecting a configuration
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Search took {time.perf_counter() - start:.1f} s in this session.")
    if not records:
        print("No finished trials yet.")
        return 0
    print_best(records, args.top_k, "in the last rung " if args.strategy == "halving" else "")
    path = plot_val_loss(list(spent.values()), args.output_dir / PLOT_NAME)
    print(f"\nLedger: {ledger.path}\nPlot: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        space, configs, device, data = prepare_search(args)
    except (ValueError, OSError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finite = all(isinstance(v, list) for v in space.values())
    size = f"{grid_size(space):,} grid points" if finite else "with continuous ranges"
    if args.strategy == "grid":
        print(f"Total hyperparameter configurations: {len(configs)}")
    print(f"Search space: {', '.join(space)} ({size}); {args.strategy} search over "
          f"{len(configs):,} configuration(s); model {args.model}; {len(data.val_inputs)} validation windows.")
    if args.estimate:
        print_estimate(args, configs, data, device)
        return 0
    lock = FolderLock(args.output_dir)
    try:
        lock.acquire()
    except OSError as err:
        problem = "it is a file, not a folder" if args.output_dir.is_file() else (err.strerror or str(err))
        print(f"error: cannot use --output-dir {args.output_dir}: {problem}.", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run_search(args, configs, data, device)
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
