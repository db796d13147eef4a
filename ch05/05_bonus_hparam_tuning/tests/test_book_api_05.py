"""The course's hparam_search.py, called the course's way.

The course's script defines HPARAM_GRID, calc_loss_batch, calc_loss_loader,
evaluate_model and train_model, and its command (`python hparam_search.py`) runs a grid
search over HPARAM_GRID with the 124M model shape on the-verdict (95/5 split, windows of
256 tokens at stride 256), seeding every configuration with 123 and ranking by
`train_model(..., eval_iter=1)`'s validation loss. The reference functions below are
that code's behaviour written out step by step; ours must give the same numbers.
"""

import itertools
import math

import pytest
import torch
from ch05_utils import read_text_file, the_verdict_path
from hparam_search import (
    HPARAM_GRID,
    MODEL_PRESETS,
    Trial,
    calc_loss_batch,
    calc_loss_loader,
    evaluate_model,
    grid_configs,
    load_space,
    main,
    parse_args,
    prepare_data,
    run_trial,
    train_model,
    validate_space,
)
from previous_chapters import GPT_CONFIG_124M, GPTModel, create_dataloader_v1

TINY = MODEL_PRESETS["tiny"]

COURSE_GRID = {  # as printed in the course's hparam_search.py
    "batch_size": [2, 4, 8, 16],
    "drop_rate": [0.0, 0.1, 0.2],
    "warmup_iters": [10, 20, 30],
    "weight_decay": [0.1, 0.01, 0.0],
    "peak_lr": [0.0001, 0.0005, 0.001, 0.005],
    "initial_lr": [0.00005, 0.0001],
    "min_lr": [0.00005, 0.00001, 0.0001],
    "n_epochs": [5, 10, 15, 20, 25],
}


def reference_train_model(model, train_loader, val_loader, optimizer, device, n_epochs, eval_iter,
                          warmup_iters=10, initial_lr=3e-05, min_lr=1e-6, lrs=None):
    """The course's train_model, step by step: steps counted from 1, warm-up up to and
    including step `warmup_iters`, cosine decay to min_lr at the last step, clipping at
    norm 1 from step `warmup_iters` on, then one evaluation over `eval_iter` batches."""
    global_step = 0
    max_lr = optimizer.param_groups[0]["lr"]
    total_training_iters = len(train_loader) * n_epochs
    lr_increment = (optimizer.param_groups[0]["lr"] - initial_lr) / warmup_iters
    for _ in range(n_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            global_step += 1
            if global_step <= warmup_iters:
                lr = initial_lr + global_step * lr_increment
            else:
                progress = (global_step - warmup_iters) / (total_training_iters - warmup_iters)
                lr = min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            if lrs is not None:
                lrs.append(lr)
            logits = model(input_batch.to(device))
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.to(device).flatten())
            loss.backward()
            if global_step >= warmup_iters:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
    return reference_evaluate(model, train_loader, val_loader, device, eval_iter)


def reference_loss_loader(data_loader, model, device, num_batches=None):
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    for i, (inputs, targets) in enumerate(data_loader):
        if i >= num_batches:
            break
        logits = model(inputs.to(device))
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten()).item()
    return total / num_batches


def reference_evaluate(model, train_loader, val_loader, device, eval_iter):
    model.eval()
    with torch.no_grad():
        train_loss = reference_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = reference_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def course_loaders(text: str, batch_size: int, context_length: int, train_ratio: float = 0.95):
    """The course's loaders: split by characters, windows at stride context_length."""
    split_idx = int(train_ratio * len(text))
    train_loader = create_dataloader_v1(text[:split_idx], batch_size=batch_size, max_length=context_length,
                                        stride=context_length, drop_last=True, shuffle=True, num_workers=0)
    val_loader = create_dataloader_v1(text[split_idx:], batch_size=batch_size, max_length=context_length,
                                      stride=context_length, drop_last=False, shuffle=False, num_workers=0)
    return train_loader, val_loader


def course_setup(text: str, hp: dict):
    """One configuration of the course's search loop (with the tiny model): seed, loaders, model, AdamW."""
    torch.manual_seed(123)
    train_loader, val_loader = course_loaders(text, hp["batch_size"], TINY["context_length"])
    model = GPTModel({**TINY, "drop_rate": hp["drop_rate"]})
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["peak_lr"], weight_decay=hp["weight_decay"])
    return model, optimizer, train_loader, val_loader


@pytest.fixture(scope="module")
def text():
    return read_text_file(the_verdict_path())[:6000]


def hparams(**changes) -> dict:
    base = {"batch_size": 4, "drop_rate": 0.1, "warmup_iters": 3, "weight_decay": 0.1, "peak_lr": 0.005,
            "initial_lr": 0.0001, "min_lr": 0.00001, "n_epochs": 1}
    return {**base, **changes}


def test_the_grid_is_the_courses_and_is_searched_in_its_order():
    assert HPARAM_GRID == COURSE_GRID and list(HPARAM_GRID) == list(COURSE_GRID)
    configs = grid_configs(validate_space(load_space("course"), "grid"))
    expected = [dict(zip(COURSE_GRID, combo, strict=True)) for combo in itertools.product(*COURSE_GRID.values())]
    assert configs == expected and len(configs) == 12_960


def test_the_courses_command_runs_the_courses_search():
    args = parse_args([])  # python hparam_search.py
    assert (args.strategy, args.space, args.model, args.train_ratio, args.min_val_windows, args.seed) == \
        ("grid", "course", "124M", 0.95, 1, 123)
    assert MODEL_PRESETS[args.model] == {**GPT_CONFIG_124M, "context_length": 256}
    # The course's data: the-verdict split 95/5, windows of 256 tokens at stride 256.
    data = prepare_data(read_text_file(the_verdict_path()), 256, args.train_ratio, args.min_val_windows)
    train_loader, val_loader = course_loaders(read_text_file(the_verdict_path()), 2, 256)
    assert torch.equal(data.train_inputs, torch.stack(train_loader.dataset.input_ids))
    assert torch.equal(data.val_targets, torch.stack(val_loader.dataset.target_ids))
    assert len(data.val_inputs) == 1  # so eval_iter=1 measures the whole validation set, as ours does
    explicit = parse_args(["--preset", "laptop", "--model", "small"])
    assert (explicit.strategy, explicit.model, explicit.train_ratio) == ("random", "small", 0.9)


def test_loss_functions_have_the_courses_signatures_and_results(text):
    model, _, train_loader, val_loader = course_setup(text, hparams())
    model.eval()
    with torch.no_grad():
        batch = next(iter(val_loader))
        expected = torch.nn.functional.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())
        assert calc_loss_batch(batch[0], batch[1], model, "cpu").item() == pytest.approx(expected.item(), rel=1e-6)
        assert calc_loss_loader(val_loader, model, "cpu") == pytest.approx(
            reference_loss_loader(val_loader, model, "cpu"), rel=1e-6)
        assert calc_loss_loader(val_loader, model, "cpu", num_batches=100) == pytest.approx(
            reference_loss_loader(val_loader, model, "cpu"), rel=1e-6)  # more batches than there are
        assert math.isnan(calc_loss_loader([], model, "cpu"))
    model.train()
    torch.manual_seed(1)
    got = evaluate_model(model, train_loader, val_loader, "cpu", 1)
    assert model.training  # back in training mode, as the course leaves it
    torch.manual_seed(1)
    assert got == pytest.approx(reference_evaluate(model, train_loader, val_loader, "cpu", 1), rel=1e-6)


@pytest.mark.parametrize("case", ["warm-up then decay", "warm-up as long as the run", "run shorter than warm-up"])
def test_train_model_gives_the_courses_numbers(text, case):
    steps_per_epoch = 10  # 6,000 characters at 95/5: 42 windows of 32 tokens, batch size 4
    warmup_iters, n_epochs = {"warm-up then decay": (3, 2), "warm-up as long as the run": (steps_per_epoch, 1),
                              "run shorter than warm-up": (steps_per_epoch + 9, 1)}[case]
    hp = hparams(warmup_iters=warmup_iters)
    expected_lrs, got_lrs = [], []
    model, optimizer, train_loader, val_loader = course_setup(text, hp)
    assert len(train_loader) == steps_per_epoch
    expected = reference_train_model(model, train_loader, val_loader, optimizer, "cpu", n_epochs, 1,
                                     warmup_iters, hp["initial_lr"], hp["min_lr"], lrs=expected_lrs)

    model, optimizer, train_loader, val_loader = course_setup(text, hp)
    optimizer.register_step_pre_hook(lambda opt, *_: got_lrs.append(opt.param_groups[0]["lr"]))
    # The course's call, in the course's argument order.
    got = train_model(model, train_loader, val_loader, optimizer, "cpu", n_epochs, 1, warmup_iters,
                      hp["initial_lr"], hp["min_lr"])
    assert got_lrs == pytest.approx(expected_lrs, rel=1e-12)
    assert got == pytest.approx(expected, rel=1e-5)
    assert max(got_lrs) <= hp["peak_lr"] * (1 + 1e-12)


def test_train_model_defaults_are_the_courses(text):
    model, optimizer, train_loader, val_loader = course_setup(text, hparams())
    lrs = []
    optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    train_loss, val_loss = train_model(model, train_loader, val_loader, optimizer, "cpu", n_epochs=2, eval_iter=1)
    assert len(lrs) == 20
    assert lrs[0] == pytest.approx(3e-05 + (0.005 - 3e-05) / 10, rel=1e-12)  # warmup_iters=10, initial_lr=3e-05
    assert lrs[9] == pytest.approx(0.005, rel=1e-12)                         # the peak at step 10
    assert lrs[-1] == pytest.approx(1e-6, rel=1e-12)                         # min_lr=1e-6 at the last step
    assert 0 < train_loss < 11 and 0 < val_loss < 11


def test_a_trial_of_the_search_is_the_courses_configuration_run(text):
    """What the command records for a configuration (val_loss) is what the course's loop
    computes for it: same seed, same windows, same shuffling, same training."""
    hp = hparams(warmup_iters=5, n_epochs=2)
    model, optimizer, train_loader, val_loader = course_setup(text, hp)
    assert len(val_loader) == 1  # eval_iter=1 then covers the whole validation split, as a trial's val_loss does
    _, course_val_loss = reference_train_model(model, train_loader, val_loader, optimizer, "cpu", hp["n_epochs"],
                                               1, hp["warmup_iters"], hp["initial_lr"], hp["min_lr"])

    data = prepare_data(text, TINY["context_length"], 0.95, min_val_windows=1)
    record = run_trial(Trial(hp, "tiny", 123, data.fingerprint), data, torch.device("cpu"))
    assert record["steps"] == 2 * len(train_loader)
    assert record["val_loss"] == pytest.approx(course_val_loss, rel=1e-5)


def test_the_command_prints_the_courses_summary(tmp_path, capsys):
    space = tmp_path / "space.json"
    space.write_text('{"batch_size": [4], "n_epochs": [1], "warmup_iters": [2], "peak_lr": [0.001, 0.005]}')
    code = main(["--space", str(space), "--model", "tiny", "--train-windows", "8",
                 "--output-dir", str(tmp_path / "out"), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert printed.startswith("Total hyperparameter configurations: 2\n")
    assert "Best hyperparameters: {'batch_size': 4, " in printed
    assert "Best Val loss: " in printed and " | Training loss " in printed
