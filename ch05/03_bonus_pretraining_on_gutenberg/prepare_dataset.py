"""Turn a folder of raw Project Gutenberg .txt files into pretraining data.

    python prepare_dataset.py --data-dir gutenberg/data/raw --output-dir gutenberg_preprocessed
    python prepare_dataset.py --data-dir $CH05_DATA_DIR/gutenberg/raw --workers 2

For every book it: decodes the bytes (UTF-8 with or without a byte-order mark; else the
charset the header declares; else latin-1), normalizes CRLF line ends, cuts away Project
Gutenberg's header and footer (licence text), drops books that are not in English, and
ends the text with GPT-2's `<|endoftext|>` token. The books are then written twice:

* `{train,val}_text_NNNN.txt`: combined UTF-8 text files of at most --max-size-mb each
  (the format of the course's script);
* `{train,val}_NNNN.bin`: the same text as GPT-2 token ids, `uint16`, at most
  --shard-tokens per shard, readable with `np.memmap(path, dtype=np.uint16, mode="r")`;

and `metadata.json` lists the files, their token counts, each split's books and the
skipped files. Whole books go to either split (never one book in both), so the
validation loss measures text the model has not seen.

The corpus is streamed: at most 2 books per worker are in memory at a time, never the
whole corpus. The output is the same for any --workers and --parallel (books are written
in a fixed, seeded order) and for repeated runs.
"""

import argparse
import codecs
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
import json
import math
import multiprocessing
import os
import random
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

EOT = "<|endoftext|>"
TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 token ids fit in 16 bits: half the size of int32

#####################################
# Decoding and stripping the Gutenberg boilerplate
#####################################

# The markers around the text proper, in both styles: older files say "THIS PROJECT
# GUTENBERG EBOOK", newer ones "THE PROJECT GUTENBERG EBOOK". Some are indented, and a
# START marker with a long title wraps onto the next line(s) up to its closing "***".
# The patterns run over the whole text at once (re.MULTILINE: ^ and $ match at every
# line), which is much faster than matching line by line in Python.
START_MARKER = re.compile(r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG"
                          r"(?:[^\n]*\*{3}[ \t]*$|(?:[^\n]*\n){1,3}?[^\n]*\*{3}[ \t]*$|[^\n]*$)",
                          re.IGNORECASE | re.MULTILINE)
# No "^" here: a pattern that starts with a literal ("***") is searched for much faster;
# _at_line_start checks that only blanks precede it on its line.
END_MARKER = re.compile(r"\*\*\*[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)
# Older files repeat the title just before the END marker ("End of the Project Gutenberg
# EBook of X", "End of Project Gutenberg's X"), sometimes followed by a credit line.
END_OF_BOOK_LINE = re.compile(r"^[ \t]*End of (?:the )?Project Gutenberg", re.IGNORECASE | re.MULTILINE)
END_OF_BOOK_SEARCH = 1000  # how many characters above the END marker to look for that line
# A volunteers' credit paragraph often opens the text proper.
CREDITS = re.compile(r"\s*(?:Produced by|E-text prepared by|Transcribed from)(?:.+\n)*", re.IGNORECASE)
CHARSET_LINE = re.compile(r"^\s*Character set encoding:\s*([\w.-]+)", re.IGNORECASE | re.MULTILINE)


def decode_book(raw: bytes) -> str:
    """Bytes of a Gutenberg file to text with '\\n' line ends.

    Gutenberg's current files are UTF-8, often with a byte-order mark; older ones are
    latin-1 or another 8-bit charset named in the header ("Character set encoding:
    ISO-8859-1"). Latin-1 is the last resort because any byte string decodes as it.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        declared = CHARSET_LINE.search(raw[:5000].decode("latin-1"))
        encoding = "latin-1"
        if declared:
            try:
                encoding = codecs.lookup(declared.group(1)).name
            except LookupError:
                pass
        text = raw.decode(encoding, errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _find_end_marker(text: str, pos: int) -> re.Match | None:
    """The first END marker at or after `pos` that begins its line (after optional blanks)."""
    while (match := END_MARKER.search(text, pos)) is not None:
        line_start = text.rfind("\n", 0, match.start()) + 1
        if not text[line_start:match.start()].strip(" \t"):
            return match
        pos = match.end()
    return None


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Cut Project Gutenberg's header and footer from a book; return (body, markers_found).

    The body is what lies between the START and END markers, minus the "End of the
    Project Gutenberg EBook of ..." line and a leading "Produced by ..." credits
    paragraph. If neither marker is found, the text is returned whole (with False).
    """
    start = START_MARKER.search(text)
    first = start.end() if start else 0
    end = _find_end_marker(text, first)
    last = end.start() if end else len(text)
    if end:  # drop "End of the Project Gutenberg EBook of ..." and what follows it
        line_start = text.rfind("\n", 0, last) + 1
        lines = list(END_OF_BOOK_LINE.finditer(text, max(first, line_start - END_OF_BOOK_SEARCH), line_start))
        if lines:
            last = lines[-1].start()
    body = text[first:last]
    credits = CREDITS.match(body)
    if credits:
        body = body[credits.end():]
    return body.strip(), bool(start or end)


#####################################
# Language detection
#####################################

# The 100 most frequent English words, leaving out those that are also frequent words of
# German, French or Spanish ("in", "an", "die", "so", "a", "no", "me", ...).
ENGLISH_WORDS = frozenset("""
the of and to that is was he it with as his for had you not be her on at by which have or
from this him but all she they were my are one their said them we who would been will when
there if more out up into do any your what has man could other than our some very time upon
about may its only now like little then can should made did us such great before must two
these see know over much down after first mr good men own never most old shall day where those
came come himself way work life without go make well through being long say might how
""".split())
WORD = re.compile(r"[^\W\d_]+")  # runs of letters, in any alphabet
ENGLISH_SAMPLE_CHARS = 40_000  # about 7,000 words: plenty for a clear verdict


def english_share(text: str) -> float:
    """Share of the words in (a sample of) `text` that are common English words.

    A simple, dependency-free language detector: running English prose scores 0.4-0.6
    (a third to a half of all words are "the", "of", "and", "to", ...), while French,
    German or Spanish text scores below 0.1, since their frequent words are others.
    The sample is taken from the middle of the book, away from front matter.
    """
    middle = len(text) // 2
    sample = text[max(0, middle - ENGLISH_SAMPLE_CHARS // 2):middle + ENGLISH_SAMPLE_CHARS // 2]
    words = WORD.findall(sample.lower())
    if not words:
        return 0.0
    return sum(map(ENGLISH_WORDS.__contains__, words)) / len(words)


#####################################
# One book: read, clean, check, tokenize (runs in the worker processes)
#####################################

_tokenizer: tiktoken.Encoding | None = None


def _get_tokenizer() -> tiktoken.Encoding:
    global _tokenizer  # one per process: worker processes each load it once
    if _tokenizer is None:
        _tokenizer = tiktoken.get_encoding("gpt2")
    return _tokenizer


@dataclass
class Book:
    """A processed book: its cleaned text and token ids, or why it is skipped."""

    file: str
    text: str = ""
    tokens: np.ndarray | None = None
    english_share: float = 0.0
    skip_reason: str | None = None
    notes: list = field(default_factory=list)


def process_book(path: Path, min_english_share: float) -> Book:
    """Read one raw Gutenberg file and return it cleaned and tokenized (or a skip reason)."""
    book = Book(file=path.name)
    try:
        raw = path.read_bytes()
    except OSError as err:
        book.skip_reason = f"unreadable: {err.strerror or err}"
        return book
    body, markers_found = strip_gutenberg(decode_book(raw))
    if not markers_found:
        book.notes.append("no Project Gutenberg START/END marker: kept the whole file")
    if not body:
        book.skip_reason = "empty after removing the Project Gutenberg header and footer"
        return book
    book.english_share = round(english_share(body), 4)
    if book.english_share < min_english_share:
        book.skip_reason = (f"not English: {book.english_share:.1%} common English words "
                            f"(needs {min_english_share:.0%})")
        return book
    book.text = body + EOT
    # encode_to_numpy skips the Python list of ints, and tiktoken releases the GIL while it works
    book.tokens = _get_tokenizer().encode_to_numpy(book.text, allowed_special={EOT}).astype(TOKEN_DTYPE)
    return book


def process_in_order(paths: list[Path], min_english_share: float, workers: int, parallel: str):
    """Yield `process_book` of each path, in the order of `paths`.

    With workers > 1 the books are processed concurrently, but at most 2 * workers are in
    flight or waiting to be written: memory stays bounded however large the corpus is,
    and the output order (hence the output) does not depend on the number of workers.
    """
    if workers == 1:
        yield from (process_book(path, min_english_share) for path in paths)
        return
    executor = (ThreadPoolExecutor(workers) if parallel == "thread"
                else ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
    with executor:
        pending = deque()
        for path in paths:
            pending.append(executor.submit(process_book, path, min_english_share))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


#####################################
# Writers: combined text files and token shards
#####################################

class TextFileWriter:
    """Appends books to `{split}_text_NNNN.txt`, starting a new file before one would
    grow past `max_bytes` (a single larger book gets a file of its own)."""

    def __init__(self, output_dir: Path, split: str, max_bytes: int):
        self.output_dir, self.split, self.max_bytes = output_dir, split, max_bytes
        self.files: list[dict] = []
        self._handle = None

    def add(self, text: str) -> None:
        data = text.encode("utf-8")
        if self._handle is None or (self.files[-1]["bytes"] and self.files[-1]["bytes"] + len(data) > self.max_bytes):
            self.close()
            name = f"{self.split}_text_{len(self.files):04d}.txt"
            self._handle = open(self.output_dir / name, "wb")
            self.files.append({"file": name, "bytes": 0, "books": 0})
        self._handle.write(data)
        self.files[-1]["bytes"] += len(data)
        self.files[-1]["books"] += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class TokenShardWriter:
    """Appends token ids to `{split}_NNNN.bin` shards of exactly `shard_tokens` tokens
    (the last one may be shorter). A shard is written to a temporary name and renamed
    when complete, so a file with the final name is never half-written."""

    def __init__(self, output_dir: Path, split: str, shard_tokens: int):
        self.output_dir, self.split = output_dir, split
        self.buffer = np.empty(shard_tokens, dtype=TOKEN_DTYPE)
        self.filled = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == len(self.buffer):
                self._flush()

    def _flush(self) -> None:
        if self.filled == 0:
            return
        name = f"{self.split}_{len(self.shards):04d}.bin"
        tmp = self.output_dir / (name + ".tmp")
        self.buffer[:self.filled].tofile(tmp)
        os.replace(tmp, self.output_dir / name)
        self.shards.append({"file": name, "tokens": int(self.filled)})
        self.filled = 0

    def close(self) -> None:
        self._flush()


#####################################
# The whole corpus
#####################################

def is_validation_book(index: int, val_fraction: float) -> bool:
    """Whether the `index`-th kept book goes to the validation split.

    Spreads ceil(n * val_fraction) validation books evenly over n books, decided book by
    book (no need to know n in advance, which keeps the pipeline streaming). The first
    book is always a validation book, so even a tiny corpus gets a validation split.
    """
    return math.ceil((index + 1) * val_fraction) > math.ceil(index * val_fraction)


def list_books(data_dir: Path, seed: int) -> list[Path]:
    """The .txt files under `data_dir`, in an order shuffled by `seed` (same seed, same order).

    Shuffling mixes authors and eras across the splits and the shards; sorting first
    makes the order independent of the file system's listing order.
    """
    paths = sorted(p for p in data_dir.rglob("*.txt") if not p.is_dir())
    random.Random(seed).shuffle(paths)
    return paths


def prepare(data_dir: Path, output_dir: Path, max_size_mb: float = 500.0, shard_tokens: int = 100_000_000,
            val_fraction: float = 0.1, min_english_share: float = 0.25, seed: int = 123, workers: int = 1,
            parallel: str = "thread", progress: bool = True) -> dict:
    """Process every book of `data_dir` into `output_dir`; return the metadata (also written
    to `output_dir/metadata.json`).

    With `workers` > 1, books are processed concurrently by a pool of threads (tiktoken
    releases Python's GIL while it tokenizes, which is most of the work) or of processes
    (which also run the Python clean-up in parallel, but cost a start-up per worker).
    """
    if parallel not in ("thread", "process"):
        raise ValueError(f"parallel must be 'thread' or 'process', got {parallel!r}")
    paths = list_books(data_dir, seed)
    if not paths:
        raise FileNotFoundError(f"No .txt files found in {data_dir}. Point --data-dir at the folder of raw books.")
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*output_dir.glob("*_text_[0-9]*.txt"), *output_dir.glob("*_[0-9]*.bin")]:
        stale.unlink()  # left from an earlier run with other settings

    splits = {
        split: {"text": TextFileWriter(output_dir, split, int(max_size_mb * 1e6)),
                "tokens": TokenShardWriter(output_dir, split, shard_tokens), "books": []}
        for split in ("train", "val")
    }
    skipped = []
    results = process_in_order(paths, min_english_share, workers, parallel)
    with tqdm(results, total=len(paths), unit="book", desc="Preparing", disable=not progress) as bar:
        for book in bar:
            for note in book.notes:
                warnings.warn(f"{book.file}: {note}", stacklevel=1)
            if book.skip_reason:
                warnings.warn(f"skipping {book.file}: {book.skip_reason}", stacklevel=1)
                skipped.append({"file": book.file, "reason": book.skip_reason})
                continue
            kept = sum(len(s["books"]) for s in splits.values())
            split = splits["val" if is_validation_book(kept, val_fraction) else "train"]
            split["text"].add(book.text)
            split["tokens"].add(book.tokens)
            split["books"].append({"file": book.file, "characters": len(book.text), "tokens": len(book.tokens),
                                   "english_share": book.english_share})
            bar.set_postfix(kept=kept + 1, skipped=len(skipped))
    for split in splits.values():
        split["text"].close()
        split["tokens"].close()

    metadata = {
        "tokenizer": "gpt2",
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "eot_token": _get_tokenizer().eot_token,
        "format": ("Each book's text is followed by <|endoftext|>; the .bin shards hold the same "
                   "text as GPT-2 token ids, little-endian uint16."),
        "settings": {"max_size_mb": max_size_mb, "shard_tokens": shard_tokens, "val_fraction": val_fraction,
                     "min_english_share": min_english_share, "seed": seed},
        "splits": {
            name: {"tokens": sum(s["tokens"] for s in split["tokens"].shards), "shards": split["tokens"].shards,
                   "text_files": split["text"].files, "books": split["books"]}
            for name, split in splits.items()
        },
        "skipped": skipped,
    }
    tmp = output_dir / "metadata.json.tmp"
    tmp.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, output_dir / "metadata.json")
    return metadata


def load_shards(output_dir: str | Path, split: str) -> list[np.memmap]:
    """Memory-map the token shards of one split (nothing is read until it is used)."""
    output_dir = Path(output_dir)
    metadata_path = output_dir / "metadata.json"
    if not metadata_path.is_file():
        raise FileNotFoundError(f"No metadata.json in {output_dir}: run prepare_dataset.py first.")
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    if split not in metadata["splits"]:
        raise ValueError(f"Unknown split {split!r}; {metadata_path} has {sorted(metadata['splits'])}.")
    return [np.memmap(output_dir / shard["file"], dtype=metadata["dtype"], mode="r")
            for shard in metadata["splits"][split]["shards"]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("gutenberg/data/raw"),
                        help="Folder with the raw Project Gutenberg .txt files (searched recursively).")
    parser.add_argument("--output-dir", type=Path, default=Path("gutenberg_preprocessed"))
    parser.add_argument("--max-size-mb", type=float, default=500.0, help="Largest combined text file (MB).")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000,
                        help="Tokens per .bin shard (2 bytes each).")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="Share of the books held out for validation.")
    parser.add_argument("--min-english-share", type=float, default=0.25,
                        help="Keep a book if at least this share of its words are common English words.")
    parser.add_argument("--seed", type=int, default=123, help="Seed of the book order.")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="Books cleaned and tokenized in parallel.")
    parser.add_argument("--parallel", choices=("thread", "process"), default="thread",
                        help="Run the workers as threads or as processes.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a folder. Download the books first (see README.md).")
    if args.max_size_mb <= 0 or args.shard_tokens < 1 or args.workers < 1:
        parser.error("--max-size-mb, --shard-tokens and --workers must be positive.")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}.")
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    try:
        metadata = prepare(args.data_dir, args.output_dir, args.max_size_mb, args.shard_tokens, args.val_fraction,
                           args.min_english_share, args.seed, args.workers, args.parallel,
                           progress=not args.no_progress)
    except FileNotFoundError as err:
        parser.error(str(err))
    for name, split in metadata["splits"].items():
        print(f"{name}: {len(split['books'])} books, {split['tokens']:,} tokens in {len(split['shards'])} shard(s), "
              f"{len(split['text_files'])} text file(s)")
    print(f"skipped: {len(metadata['skipped'])} file(s); wrote {args.output_dir / 'metadata.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
