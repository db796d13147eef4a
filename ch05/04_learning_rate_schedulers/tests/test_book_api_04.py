"""The book's calls of this folder's code, made the book's way.

The course's README for this folder points to appendix D of the book, whose
`train_model(model, train_loader, val_loader, optimizer, device, n_epochs, eval_freq,
eval_iter, start_context, tokenizer, warmup_steps, initial_lr=3e-05, min_lr=1e-6)`
adds warm-up, cosine decay and clipping (from the end of warm-up on, at norm 1.0) to the
chapter's loop and returns (train_losses, val_losses, track_tokens_seen, track_lrs).
`reference_train_model` below is that loop written out step by step, as the appendix
teaches it; `lr_schedule.train_model` must give the same numbers when called with the
same positional arguments.
"""

import math

import pytest
import torch
from ch05_utils import calc_loss_batch, evaluate_model, read_text_file, the_verdict_path
from lr_schedule import train_model
from previous_chapters import GPT_CONFIG_124M, GPTModel, create_dataloader_v1, get_tokenizer

TINY = {**GPT_CONFIG_124M, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1}


def reference_train_model(model, train_loader, val_loader, optimizer, device, n_epochs, eval_freq, eval_iter,
                          warmup_steps, initial_lr, min_lr):
    """Appendix D's loop, spelled out: steps counted from 0, linear warm-up, then cosine decay
    from the optimizer's rate to min_lr, clipping from the first step after warm-up on."""
    train_losses, val_losses, track_tokens_seen, track_lrs = [], [], [], []
    tokens_seen, global_step = 0, -1
    peak_lr = optimizer.param_groups[0]["lr"]
    total_steps = len(train_loader) * n_epochs
    lr_increment = (peak_lr - initial_lr) / warmup_steps
    for _ in range(n_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            global_step += 1
            if global_step < warmup_steps:
                lr = initial_lr + global_step * lr_increment
            else:
                progress = (global_step - warmup_steps) / (total_steps - warmup_steps)
                lr = min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
            for group in optimizer.param_groups:
                group["lr"] = lr
            track_lrs.append(lr)
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            if global_step >= warmup_steps:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            tokens_seen += input_batch.numel()
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
    return train_losses, val_losses, track_tokens_seen, track_lrs


def book_setup():
    """The book's set-up: global seed, loaders without their own generator, AdamW."""
    text = read_text_file(the_verdict_path())[:4000]
    split = int(0.9 * len(text))
    torch.manual_seed(123)
    train_loader = create_dataloader_v1(text[:split], batch_size=2, max_length=16, stride=16,
                                        shuffle=True, drop_last=True)
    val_loader = create_dataloader_v1(text[split:], batch_size=2, max_length=16, stride=16,
                                      shuffle=False, drop_last=False)
    model = GPTModel(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
    return model, optimizer, train_loader, val_loader


def test_appendix_d_call_gives_the_appendix_d_numbers(capsys):
    model, optimizer, train_loader, val_loader = book_setup()
    # The appendix's call, positional up to warmup_steps, as the book writes it.
    got = train_model(model, train_loader, val_loader, optimizer, "cpu", 2, 5, 1, "Every effort moves you",
                      get_tokenizer(), 4, initial_lr=1e-5, min_lr=1e-5)
    printed = capsys.readouterr().out

    model, optimizer, train_loader, val_loader = book_setup()
    expected = reference_train_model(model, train_loader, val_loader, optimizer, "cpu", 2, 5, 1,
                                     warmup_steps=4, initial_lr=1e-5, min_lr=1e-5)

    assert len(got) == 4
    train_losses, val_losses, tokens_seen, lrs = got
    total = 2 * len(train_loader)
    assert len(lrs) == total and len(train_losses) == len(val_losses) == len(tokens_seen) == math.ceil(total / 5)
    assert lrs == pytest.approx(expected[3], rel=1e-12)
    assert tokens_seen == expected[2]
    assert train_losses == pytest.approx(expected[0], rel=1e-5)
    assert val_losses == pytest.approx(expected[1], rel=1e-5)
    # The appendix's progress lines and one sample per epoch.
    assert printed.count("Ep 1 (Iter 000000): Train loss") == 1
    assert printed.count("Every effort moves you") == 2


def test_appendix_d_defaults_and_keyword_only_extras():
    model, optimizer, train_loader, val_loader = book_setup()
    _, _, _, lrs = train_model(model, train_loader, val_loader, optimizer, "cpu", 1, 100, 1, None, None, 2)
    assert lrs[0] == pytest.approx(3e-05, rel=1e-12)  # the book's default initial_lr
    assert lrs[-1] > 1e-6 and lrs[-1] < 1e-4           # decays towards the default min_lr
    with pytest.raises(TypeError):  # our extras never take a positional slot of the book's call
        train_model(model, train_loader, val_loader, optimizer, "cpu", 1, 100, 1, None, None, 2, 3e-5, 1e-6, 1.0)
