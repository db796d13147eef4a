"""The course's code for this folder works here: its flags, its functions with their
signatures, its commands and its own test, with the course's behaviour."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import prepare_dataset
import pretraining_simple
import pytest
import tiktoken
import torch
from prepare_dataset import combine_files, decode_book, is_english, strip_gutenberg
from pretraining_simple import (
    MODEL_PRESETS,
    convert_time,
    create_dataloaders,
    load_text_folder,
    print_eta,
    read_text_file,
    train_model_simple,
)
from previous_chapters import GPTDatasetV1, GPTModel, create_dataloader_v1, evaluate_model

HERE = Path(__file__).resolve().parent.parent
RAW = Path(os.environ.get("CH05_DATA_DIR", HERE.parents[2] / "shared" / "data")) / "gutenberg" / "raw"
pytestmark = pytest.mark.skipif(not RAW.is_dir(), reason=f"no raw Gutenberg books at {RAW}")
# The course's --debug model.
COURSE_DEBUG_CONFIG = {"vocab_size": 50257, "context_length": 10, "emb_dim": 12, "n_heads": 2, "n_layers": 2,
                       "drop_rate": 0.0, "qkv_bias": False}
QUIET = ["--eval-tokens", "64", "--no-progress", "--device", "cpu", "--print-sample-iter", "0"]


def metamorphosis(start: int, chars: int) -> str:
    body = strip_gutenberg(decode_book((RAW / "pg5200.txt").read_bytes()))[0]
    return body[start:start + chars]


def write_texts(folder: Path, sizes: list[int]) -> list[Path]:
    """Plain .txt files (no Project Gutenberg markers) of the given sizes, cut from one book."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for i, size in enumerate(sizes):
        paths.append(folder / f"text{i}.txt")
        paths[-1].write_text(metamorphosis(start, size), encoding="utf-8")
        start += size
    return paths


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def call(main, argv: list, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


#####################################
# Flags
#####################################

def test_the_course_flags_are_aliases_with_the_course_meaning():
    prepare_args = prepare_dataset.build_parser().parse_args(
        ["--data_dir", "raw", "--max_size_mb", "50", "--output_dir", "prep"])
    assert (prepare_args.data_dir, prepare_args.max_size_mb, prepare_args.output_dir) == (Path("raw"), 50, Path("prep"))
    assert prepare_dataset.build_parser().parse_args([]).data_dir == Path("gutenberg/data/raw")  # the course's default

    parser = pretraining_simple.build_parser()
    args = parser.parse_args(["--data_dir", "d", "--output_dir", "o", "--n_epochs", "3", "--print_sample_iter", "7",
                              "--eval_freq", "9", "--save_ckpt_freq", "11", "--lr", "0.01", "--batch_size", "6",
                              "--debug", "true"])
    assert (args.data_dir, args.output_dir, args.num_epochs, args.print_sample_iter, args.eval_freq,
            args.checkpoint_every, args.lr, args.batch_size, args.debug) == (
        Path("d"), Path("o"), 3, 7, 9, 11, 0.01, 6, True)
    defaults = parser.parse_args([])  # the course's defaults
    assert (defaults.data_dir, defaults.output_dir, defaults.num_epochs, defaults.print_sample_iter,
            defaults.eval_freq, defaults.lr, defaults.batch_size, defaults.debug) == (
        Path("gutenberg/data"), Path("model_checkpoints"), 1, 1000, 100, 5e-4, 4, False)
    assert MODEL_PRESETS["124M"]["context_length"] == 1024  # the course's GPT-2 124M config


def test_the_course_flags_drive_a_run_on_a_folder_of_text_files(tmp_path, capsys, monkeypatch):
    write_texts(tmp_path / "texts", [1500, 1500])
    saved_steps = []

    def recording_save(obj, path):
        if "step" in obj:
            saved_steps.append(obj["step"])
        return save(obj, path)

    save = pretraining_simple.save_checkpoint_atomic
    monkeypatch.setattr(pretraining_simple, "save_checkpoint_atomic", recording_save)
    out = tmp_path / "out"
    code, stdout, err = call(pretraining_simple.main, [
        "--data_dir", tmp_path / "texts", "--output_dir", out, "--n_epochs", "2", "--batch_size", "4",
        "--eval_freq", "3", "--save_ckpt_freq", "5", "--lr", "0.002", "--debug", "true", *QUIET,
        "--print_sample_iter", "8"], capsys)
    assert code == 0, err
    train, _ = load_text_folder(tmp_path / "texts", progress=False)
    steps = 2 * (((len(train) - 1) // 32) // 4)  # two epochs of batches of 4 windows of 32 tokens
    entries = pretraining_simple.read_log(out / "log.jsonl")
    assert [e["step"] for e in entries if "loss" in e] == list(range(steps))
    assert [e["step"] for e in entries if "val_loss" in e] == sorted({*range(0, steps, 3), steps - 1})
    assert max(e["lr"] for e in entries if "lr" in e) == pytest.approx(0.002)
    assert stdout.count("Every effort moves you") == len(range(0, steps, 8))
    assert saved_steps == sorted({*range(5, steps + 1, 5), steps})
    state_dict = torch.load(out / "model_pg_final.pth", weights_only=True)
    GPTModel(MODEL_PRESETS["tiny"]).load_state_dict(state_dict, strict=True)
    assert "Maximum GPU memory allocated" in stdout


def test_the_course_readme_commands_with_local_books(tmp_path, capsys, monkeypatch):
    """`prepare_dataset.py --data_dir ... --max_size_mb 500 --output_dir gutenberg_preprocessed`, then
    `pretraining_simple.py --data_dir "gutenberg_preprocessed" --n_epochs 1 --batch_size 4
    --output_dir model_checkpoints` (with --debug true: the course's 124M model is too slow here)."""
    monkeypatch.chdir(tmp_path)
    raw = Path("gutenberg/data/raw")
    raw.mkdir(parents=True)
    for name in ("pg5200.txt", "pg84.txt"):
        (raw / name).write_bytes((RAW / name).read_bytes())
    code, stdout, err = call(prepare_dataset.main, ["--data_dir", "gutenberg/data/raw", "--max_size_mb", "500",
                                                    "--output_dir", "gutenberg_preprocessed", "--no-progress"], capsys)
    assert code == 0 and "train: 1 books" in stdout and "val: 1 books" in stdout, err
    code, stdout, err = call(pretraining_simple.main, [
        "--data_dir", "gutenberg_preprocessed", "--n_epochs", "1", "--batch_size", "4", "--output_dir",
        "model_checkpoints", "--debug", "true", "--max-steps", "3", *QUIET], capsys)
    assert code == 0 and "Done: 3 steps" in stdout, err
    assert Path("model_checkpoints/model_pg_final.pth").is_file()


def test_the_course_test_runs_here(tmp_path):
    """The course's tests.py: a folder gutenberg/data with one repeated sequence, then
    `python pretraining_simple.py --debug true` with every other setting at its default."""
    folder = tmp_path / "gutenberg" / "data"
    folder.mkdir(parents=True)
    (folder / "repeated_sequence.txt").write_text("a b c d" * 1000)
    result = subprocess.run([sys.executable, str(HERE / "pretraining_simple.py"), "--debug", "true"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Maximum GPU memory allocated" in result.stdout, result.stderr[-3000:]
    state_dict = torch.load(tmp_path / "model_checkpoints" / "model_pg_final.pth", weights_only=True)
    GPTModel(MODEL_PRESETS["tiny"]).load_state_dict(state_dict, strict=True)


#####################################
# Plain text folders, and small or non-English text
#####################################

def test_a_folder_of_text_files_is_split_90_10_per_file(tmp_path):
    paths = write_texts(tmp_path / "texts", [3000, 1000])
    (tmp_path / "texts" / "notes.md").write_text("not a .txt file")
    train, val = load_text_folder(tmp_path / "texts", progress=False)
    tokenizer = tiktoken.get_encoding("gpt2")
    expected = {"train": [], "val": []}
    for path in paths:  # the course: the book plus " <|endoftext|> ", cut at 90% of its characters
        text = path.read_text() + " <|endoftext|> "
        cut = int(0.9 * len(text))
        expected["train"] += tokenizer.encode(text[:cut], allowed_special="all")
        expected["val"] += tokenizer.encode(text[cut:], allowed_special="all")
    assert train.read(0, len(train)).tolist() == expected["train"]
    assert val.read(0, len(val)).tolist() == expected["val"]


def test_a_text_file_that_is_not_utf8_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "old.txt").write_bytes("Caf\xe9 au lait. ".encode("latin-1") * 200)
    code, _, err = call(pretraining_simple.main, ["--data_dir", tmp_path / "texts", "--output_dir", tmp_path / "o",
                                                  "--debug", "true", *QUIET], capsys)
    assert code == 2 and "old.txt is not UTF-8" in err and "Traceback" not in err


def test_a_tiny_text_says_why_it_cannot_train_and_what_changes_it(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "tiny.txt").write_text("The cat sat on the mat, and the dog was in the house with her. " * 30)
    prepared = tmp_path / "prepared"
    code, stdout, err = call(prepare_dataset.main, ["--data_dir", raw, "--output_dir", prepared, "--no-progress"],
                             capsys)
    assert code == 0 and "train: 0 books" in stdout
    assert "the train split is empty" in err and "went to validation" in err and "--data-dir" in err
    code, _, err = call(pretraining_simple.main, ["--data_dir", prepared, "--output_dir", tmp_path / "o",
                                                  "--debug", "true", *QUIET], capsys)
    assert code == 2 and "went to validation" in err and "pretraining_simple.py --data-dir" in err
    # The flag it names works: the folder of text files itself, split 90/10 as in the course.
    code, stdout, err = call(pretraining_simple.main, ["--data_dir", raw, "--output_dir", tmp_path / "o",
                                                       "--debug", "true", *QUIET], capsys)
    assert code == 0 and "Done:" in stdout, err
    # Too small even for that: the flags that help are named.
    (raw / "tiny.txt").write_text("Too short. " * 10)
    code, _, err = call(pretraining_simple.main, ["--data_dir", raw, "--output_dir", tmp_path / "o2",
                                                  "--debug", "true", *QUIET], capsys)
    assert code == 2 and "too small" in err and "--batch-size" in err and "--context-length" in err


def test_non_english_books_say_which_flag_keeps_them(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("pg22367.txt", "pg5318.txt"):  # German and French: the course's ASCII check lets them through
        (raw / name).write_bytes((RAW / name).read_bytes())
        assert is_english(decode_book((RAW / name).read_bytes()))
    code, stdout, err = call(prepare_dataset.main, ["--data_dir", raw, "--output_dir", tmp_path / "p",
                                                    "--no-progress"], capsys)
    assert code == 0 and "train: 0 books" in stdout and "--min-english-share 0" in err
    code, _, err = call(pretraining_simple.main, ["--data_dir", tmp_path / "p", "--output_dir", tmp_path / "o",
                                                  "--debug", "true", *QUIET], capsys)
    assert code == 2 and "kept no book" in err and "--min-english-share 0" in err
    code, stdout, _ = call(prepare_dataset.main, ["--data_dir", raw, "--output_dir", tmp_path / "p",
                                                  "--min-english-share", "0", "--no-progress"], capsys)
    assert code == 0 and "train: 1 books" in stdout and "val: 1 books" in stdout


#####################################
# The course's functions
#####################################

def test_is_english_is_the_course_ascii_check():
    assert is_english("Every effort moves you.")
    assert not is_english("Каждое усилие движет тобой.")
    assert is_english("aé", threshold=0.4) and not is_english("aé")  # share of ASCII characters > threshold
    assert not is_english("")


def test_combine_files_as_the_course(tmp_path, capsys):
    def book(title: str, body: str) -> str:
        return (f"The Project Gutenberg eBook of {title}\n\n*** START OF THE PROJECT GUTENBERG EBOOK {title} ***\n"
                f"{body}\n*** END OF THE PROJECT GUTENBERG EBOOK {title} ***\nLicence text.\n")

    (tmp_path / "a.txt").write_text(book("A", "First line.\n\n\n\nSecond paragraph."), encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(book("B", "Caf\xe9 au lait, " * 20).encode("latin-1"))  # not UTF-8
    (tmp_path / "c.txt").write_text(book("C", "Каждое усилие движет тобой. " * 20), encoding="utf-8")
    files = [str(tmp_path / name) for name in ("a.txt", "b.txt", "c.txt")]

    assert combine_files(files, tmp_path / "one") == 1
    assert "Skipping" in capsys.readouterr().out  # c.txt: mostly not ASCII
    combined = (tmp_path / "one" / "combined_1.txt").read_text(encoding="utf-8")
    assert combined == "First line.\n\nSecond paragraph.<|endoftext|>" + ("Café au lait, " * 20).strip()
    assert combine_files(files, tmp_path / "two", max_size_mb=100 / 2**20, separator="|") == 2
    assert (tmp_path / "two" / "combined_1.txt").read_text() == "First line.\n\nSecond paragraph."
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["combined_1.txt", "combined_2.txt"]


def test_read_text_file_and_create_dataloaders(tmp_path):
    path = write_texts(tmp_path, [4000])[0]
    text = read_text_file(path)
    assert text == path.read_text(encoding="utf-8")
    train_loader, val_loader = create_dataloaders(text, train_ratio=0.9, batch_size=4, max_length=16, stride=8)
    cut = int(0.9 * len(text))
    tokenizer = tiktoken.get_encoding("gpt2")
    train_windows, val_windows = (GPTDatasetV1(part, tokenizer, 16, 8) for part in (text[:cut], text[cut:]))
    assert len(train_loader) == len(train_windows) // 4 and train_loader.drop_last
    assert isinstance(train_loader.sampler, torch.utils.data.RandomSampler)
    assert not val_loader.drop_last and isinstance(val_loader.sampler, torch.utils.data.SequentialSampler)
    val_inputs = torch.cat([inputs for inputs, _ in val_loader])
    assert torch.equal(val_inputs, torch.stack(val_windows.input_ids))


def test_convert_time_and_print_eta(capsys, monkeypatch):
    assert convert_time(3725.9) == (1, 2, 5)
    monkeypatch.setattr(pretraining_simple.time, "time", lambda: 10_000.0)
    print_eta(start_time=10_000.0 - 7200, book_start_time=10_000.0 - 3600, index=2, total_files=5)
    assert capsys.readouterr().out.splitlines() == [
        "Book processed 1h 0m 0s", "Total time elapsed 2h 0m 0s", "ETA for remaining books: 3h 0m 0s"]


def course_loop(model, optimizer, files, batch_size, eval_freq, eval_iter, train_ratio=0.9):
    """The course's book-by-book loop written out plainly, as the reference for `train_model_simple`."""
    ctx = model.pos_emb.weight.shape[0]
    train_losses, val_losses, track_tokens_seen, tokens_seen, step, book_ends = [], [], [], 0, -1, []
    for path in files:
        text = Path(path).read_text(encoding="utf-8") + " <|endoftext|> "
        cut = int(train_ratio * len(text))
        train = create_dataloader_v1(text[:cut], batch_size=batch_size, max_length=ctx, stride=ctx)
        val = create_dataloader_v1(text[cut:], batch_size=batch_size, max_length=ctx, stride=ctx, shuffle=False,
                                   drop_last=False)
        model.train()
        for inputs, targets in train:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            loss.backward()
            optimizer.step()
            tokens_seen, step = tokens_seen + inputs.numel(), step + 1
            if step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train, val, "cpu", eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
        book_ends.append(step)
    return (train_losses, val_losses, track_tokens_seen), book_ends


def _fresh_model_and_optimizer():
    torch.manual_seed(123)
    model = GPTModel(COURSE_DEBUG_CONFIG)
    return model, torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)


def test_train_model_simple_computes_what_the_course_loop_computes(tmp_path, capsys):
    files = [str(p) for p in write_texts(tmp_path / "books", [1500, 1200])]
    model, optimizer = _fresh_model_and_optimizer()
    torch.manual_seed(1)
    expected, book_ends = course_loop(model, optimizer, files, batch_size=4, eval_freq=5, eval_iter=1)
    model, optimizer = _fresh_model_and_optimizer()
    torch.manual_seed(1)
    out = tmp_path / "out"
    out.mkdir()
    save_ckpt_freq = book_ends[0]  # the first book ends on a multiple of it: no file for it (the course's rule)
    tokenizer = tiktoken.get_encoding("gpt2")
    result = train_model_simple(model, optimizer, "cpu", 1, 5, 1, 100, "Every effort moves you", out, save_ckpt_freq,
                                tokenizer, 4, 0.9, files=files)  # the course's argument order
    assert result == expected and len(result[0]) == book_ends[-1] // 5 + 1
    assert sorted(p.name for p in out.iterdir()) == [f"model_pg_{book_ends[1]}.pth"]
    printed = capsys.readouterr().out
    assert f"Tokenizing file 2 of 2: {files[1]}" in printed and "ETA for remaining books" in printed
    assert re.search(r"Ep 1 \(Step 5\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}", printed)


def test_train_model_simple_reads_the_course_global_and_saves_on_ctrl_c(tmp_path, monkeypatch):
    files = [str(p) for p in write_texts(tmp_path / "books", [1500])]
    monkeypatch.setattr(pretraining_simple, "all_files", files, raising=False)  # as the course's script sets it
    calls = 0

    def interrupted_on_the_fourth_batch(*args):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt
        return loss_batch(*args)

    loss_batch = pretraining_simple.calc_loss_batch
    monkeypatch.setattr(pretraining_simple, "calc_loss_batch", interrupted_on_the_fourth_batch)
    model, optimizer = _fresh_model_and_optimizer()
    train_model_simple(model, optimizer, "cpu", n_epochs=1, eval_freq=100, eval_iter=1, print_sample_iter=100,
                       start_context="Every effort", output_dir=tmp_path, save_ckpt_freq=100,
                       tokenizer=tiktoken.get_encoding("gpt2"), batch_size=2)
    saved = torch.load(tmp_path / "model_pg_2_interrupted.pth", weights_only=True)  # after steps 0, 1 and 2
    GPTModel(COURSE_DEBUG_CONFIG).load_state_dict(saved, strict=True)
