"""Tests of lr_schedule.py: schedule values, argument checks, clipping and the training loop."""

import math

import pytest
import torch
from ch05_utils import create_train_val_loaders, read_text_file, set_seed, the_verdict_path, train_model_simple
from lr_schedule import apply_lr, clip_gradients, lr_at_step, train_model
from previous_chapters import GPT_CONFIG_124M, GPTModel, get_tokenizer

TINY = {**GPT_CONFIG_124M, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1}


#####################################
# lr_at_step
#####################################

# A 20-step run: 4 warm-up steps from 1e-4 to 1e-3, then cosine decay to 1e-5 at step 20.
RUN = dict(total_steps=20, peak_lr=1e-3, warmup_steps=4, initial_lr=1e-4, min_lr=1e-5)


@pytest.mark.parametrize("step, expected", [
    (0, 1e-4),                         # warm-up starts at initial_lr
    (1, 1e-4 + 0.9e-3 / 4),            # one quarter of the way up
    (2, 5.5e-4),                       # half-way up
    (4, 1e-3),                         # the peak, at the first step after warm-up
    (12, 1e-5 + (1e-3 - 1e-5) / 2),    # half-way through the decay: cos(pi/2) = 0
    (16, 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.75))),
    (20, 1e-5),                        # min_lr at total_steps
    (25, 1e-5),                        # and after it
])
def test_lr_at_known_steps(step, expected):
    assert lr_at_step(step, **RUN) == pytest.approx(expected, rel=1e-12)


def test_schedule_rises_then_falls():
    lrs = [lr_at_step(s, **RUN) for s in range(21)]
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5], strict=True))
    assert all(a > b for a, b in zip(lrs[4:20], lrs[5:21], strict=True))
    assert max(lrs) == RUN["peak_lr"]


def test_no_warmup_starts_at_peak_and_equal_min_is_constant():
    assert lr_at_step(0, 10, 4e-4) == 4e-4
    assert lr_at_step(9, 10, 4e-4) > 0
    assert {lr_at_step(s, 10, 4e-4, min_lr=4e-4) for s in range(10)} == {4e-4}


def test_warmup_over_the_whole_run():
    assert lr_at_step(5, 10, 1.0, warmup_steps=10) == 0.5
    assert lr_at_step(10, 10, 1.0, warmup_steps=10, min_lr=0.1) == 0.1


@pytest.mark.parametrize("kwargs, message", [
    (dict(step=-1), "step must be"),
    (dict(step=1.5), "step must be"),
    (dict(total_steps=0), "total_steps must be"),
    (dict(warmup_steps=21), "warmup_steps must be"),
    (dict(warmup_steps=-1), "warmup_steps must be"),
    (dict(peak_lr=0.0), "peak_lr must be > 0"),
    (dict(peak_lr=float("nan")), "peak_lr must be a finite"),
    (dict(min_lr=-1e-5), "min_lr must be a finite"),
    (dict(initial_lr=2e-3), "must not exceed peak_lr"),
    (dict(min_lr=2e-3), "must not exceed peak_lr"),
])
def test_bad_arguments_are_named(kwargs, message):
    args = dict(step=0, **RUN) | kwargs
    with pytest.raises(ValueError, match=message):
        lr_at_step(**args)


#####################################
# Clipping
#####################################

def _model_with_gradients(scale: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    (model(torch.randn(5, 4)).sum() * scale).backward()
    return model


def _norm(model) -> float:
    return torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])).item()


def test_clipping_bounds_the_global_norm_and_keeps_the_direction():
    model = _model_with_gradients(scale=100.0)
    before = [p.grad.clone() for p in model.parameters()]
    norm_before = _norm(model)
    assert norm_before > 1.0
    returned = clip_gradients(model, max_grad_norm=1.0)
    assert returned.item() == pytest.approx(norm_before, rel=1e-6)  # the norm before clipping
    assert _norm(model) == pytest.approx(1.0, rel=1e-5)
    for old, new in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(new.grad, old / norm_before, rtol=1e-5, atol=1e-8)


def test_small_gradients_and_no_limit_are_left_alone():
    for scale, limit in ((0.001, 1.0), (100.0, None)):
        model = _model_with_gradients(scale)
        before = [p.grad.clone() for p in model.parameters()]
        clip_gradients(model, limit)
        for old, new in zip(before, model.parameters(), strict=True):
            assert torch.equal(old, new.grad)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        clip_gradients(model, 0.0)


def test_apply_lr_sets_every_group():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 1.0}], lr=0.1)
    apply_lr(optimizer, 0.25)
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.25]


#####################################
# train_model
#####################################

@pytest.fixture(scope="module")
def verdict_loaders():
    text = read_text_file(the_verdict_path())[:3000]  # ~700 tokens: 9 batches, enough for a few steps
    return create_train_val_loaders(text, TINY, batch_size=4)


def _fresh(lr=1e-3):
    set_seed(123)
    model = GPTModel(TINY)
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)


def test_without_schedule_or_clipping_it_is_the_chapter_loop(verdict_loaders):
    train_loader, val_loader = verdict_loaders
    quiet = dict(print_fn=lambda *_: None)
    # One epoch: at an epoch's end the chapter loop stops without exhausting the loader's
    # iterator, which leaves its shuffle generator in a different state for epoch 2.
    model, optimizer = _fresh()
    train_loader.generator.manual_seed(123)
    expected = train_model_simple(model, train_loader, val_loader, optimizer, "cpu", num_epochs=1,
                                  eval_freq=2, eval_iter=1, start_context="Every effort", tokenizer=get_tokenizer(),
                                  **quiet)
    model, optimizer = _fresh()
    train_loader.generator.manual_seed(123)  # the loader's shuffle order starts over too
    got = train_model(model, train_loader, val_loader, optimizer, "cpu", n_epochs=1, eval_freq=2, eval_iter=1,
                      start_context="Every effort", tokenizer=get_tokenizer(), warmup_steps=0, min_lr=1e-3,
                      max_grad_norm=None, **quiet)
    assert got[:3] == expected
    assert got[3] == [1e-3] * len(train_loader)


def test_schedule_clipping_and_grad_norm_tracking(verdict_loaders):
    train_loader, val_loader = verdict_loaders
    model, optimizer = _fresh(lr=5e-3)
    warmup, max_norm = 3, 0.5
    norms_at_step = []  # the global norm each optimizer.step() actually sees (after clipping)
    optimizer.register_step_pre_hook(lambda *_: norms_at_step.append(_norm(model)))
    grad_norms, printed = [], []
    train_losses, val_losses, tokens, lrs = train_model(
        model, train_loader, val_loader, optimizer, "cpu", n_epochs=2, eval_freq=4, eval_iter=1,
        start_context=None, tokenizer=None, warmup_steps=warmup, initial_lr=1e-5, min_lr=1e-6,
        max_grad_norm=max_norm, track_grad_norms=grad_norms, print_fn=printed.append)

    total = 2 * len(train_loader)
    assert lrs == [lr_at_step(s, total, 5e-3, warmup, 1e-5, 1e-6) for s in range(total)]
    assert len(grad_norms) == len(norms_at_step) == total
    for step, (measured, seen) in enumerate(zip(grad_norms, norms_at_step, strict=True)):
        if step < warmup:  # no clipping during warm-up
            assert seen == pytest.approx(measured, rel=1e-5)
        else:
            assert seen <= max_norm * (1 + 1e-4)
            assert seen == pytest.approx(min(measured, max_norm), rel=1e-4)
    assert max(grad_norms[warmup:]) > max_norm  # the test exercised real clipping
    assert len(train_losses) == len(val_losses) == len(tokens) == len(printed) == math.ceil(total / 4)
    assert train_losses[-1] < train_losses[0] - 0.1  # it learns


def test_empty_loader_is_refused(verdict_loaders):
    _, val_loader = verdict_loaders
    model, optimizer = _fresh()
    with pytest.raises(ValueError, match="nothing to train on"):
        train_model(model, [], val_loader, optimizer, "cpu", 1, 1, 1, None, None, warmup_steps=0)
