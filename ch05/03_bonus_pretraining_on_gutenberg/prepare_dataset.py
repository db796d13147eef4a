"""Turn a folder of raw Project Gutenberg .txt files into pretraining data.

    python prepare_dataset.py --data-dir gutenberg/data/raw --output-dir gutenberg_preprocessed
    python prepare_dataset.py --data-dir $CH05_DATA_DIR/gutenberg/raw --workers 2
    python prepare_dataset.py --data_dir gutenberg/data/raw --max_size_mb 500 --output_dir gutenberg_preprocessed

(The course's underscore flags, as in the last line, are accepted too.) For every book it:
decodes the bytes (UTF-8 with or without a byte-order mark; else the charset the header
declares; else latin-1), normalizes CRLF line ends, cuts away Project Gutenberg's header
and footer (licence text), drops books that are not in English, and ends the text with
GPT-2's `<|endoftext|>` token. The books are then written twice, into a folder
`dataset-NNNN/` inside --output-dir:

* `{train,val}_text_NNNN.txt`: combined UTF-8 text files of at most --max-size-mb each
  (the format of the course's script);
* `{train,val}_NNNN.bin`: the same text as GPT-2 token ids, `uint16`, at most
  --shard-tokens per shard, readable with `np.memmap(path, dtype=np.uint16, mode="r")`;

and `metadata.json` lists the files, their token counts, each split's books and the
skipped files. Whole books go to either split (never one book in both), so the
validation loss measures text the model has not seen.

A re-run writes the new dataset into a new `dataset-NNNN/` folder beside the old one and
switches to it by replacing `metadata.json` (an atomic rename); only then does it delete
the old one. A run killed at any moment leaves the old or the new dataset complete.
`manifest.json` lists every file the script has created, and it deletes nothing else.

The corpus is streamed: at most 2 books per worker are in memory at a time, never the
whole corpus. The output is the same for any --workers and --parallel (books are written
in a fixed, seeded order) and for repeated runs.
"""

import argparse
import codecs
import json
import math
import multiprocessing
import os
import random
import re
import sys
import tempfile
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

EOT = "<|endoftext|>"
TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 token ids fit in 16 bits: half the size of int32
METADATA = "metadata.json"
MANIFEST = "manifest.json"
BOOK_SUFFIXES = (".txt", ".txt.utf8")  # the raw files of the pgcorpus mirror, as the course's script reads them


class DatasetError(ValueError):
    """A prepared dataset that cannot be used as it is (damaged, incomplete, not ours)."""


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


def decode_book(raw: bytes, *, fallback_encoding: str = "latin-1") -> str:
    """Bytes of a Gutenberg file to text with '\\n' line ends.

    Gutenberg's current files are UTF-8, often with a byte-order mark; older ones are
    latin-1 or another 8-bit charset named in the header ("Character set encoding:
    ISO-8859-1"). `fallback_encoding` (latin-1) is the last resort because any byte
    string decodes as it.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        declared = CHARSET_LINE.search(raw[:5000].decode("latin-1"))
        encoding = fallback_encoding
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


def is_english(text: str, threshold: float = 0.9) -> bool:
    """The course's language check: whether more than `threshold` of the characters are ASCII.

    The course's `combine_files` uses it. It lets through every language written mostly
    in Latin letters (German, French and Spanish text is about 98% ASCII), which is why
    `prepare` counts common English words (`english_share`) instead.
    """
    if not text:
        return False
    return len(text.encode("ascii", errors="ignore")) / len(text) > threshold


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

def _no_registration(path: Path) -> None:
    """The default `register` of the writers: nothing to record."""


def _close_durably(handle) -> None:
    """Flush a file to disk before closing it, so a rename that publishes it publishes its contents."""
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


class TextFileWriter:
    """Appends texts to numbered UTF-8 files (`name_format.format(index)`), starting a new
    file before one would grow past `max_bytes` of text (a single larger text gets a file
    of its own). Within a file, texts are joined by `separator`. Each file is written
    under a temporary name and renamed when complete. `register(path)` is called before
    a file is created, so the caller can record it."""

    def __init__(self, output_dir: Path, name_format: str, max_bytes: int, *, separator: str = "",
                 first_index: int = 0, register: Callable[[Path], None] = _no_registration):
        self.output_dir, self.name_format, self.max_bytes = output_dir, name_format, max_bytes
        self.separator, self.first_index, self.register = separator.encode("utf-8"), first_index, register
        self.files: list[dict] = []
        self._handle, self._text_bytes = None, 0

    def add(self, text: str) -> None:
        data = text.encode("utf-8")
        if self._handle is None or (self._text_bytes and self._text_bytes + len(data) > self.max_bytes):
            self.close()
            name = self.name_format.format(self.first_index + len(self.files))
            self.register(self.output_dir / (name + ".tmp"))
            self.register(self.output_dir / name)
            self._handle = open(self.output_dir / (name + ".tmp"), "wb")
            self.files.append({"file": name, "bytes": 0, "books": 0})
        if self.files[-1]["books"]:
            self._handle.write(self.separator)
            self.files[-1]["bytes"] += len(self.separator)
        self._handle.write(data)
        self._text_bytes += len(data)
        self.files[-1]["bytes"] += len(data)
        self.files[-1]["books"] += 1

    def close(self) -> None:
        if self._handle is not None:
            _close_durably(self._handle)
            name = self.output_dir / self.files[-1]["file"]
            os.replace(name.with_name(name.name + ".tmp"), name)
            self._handle, self._text_bytes = None, 0


class TokenShardWriter:
    """Appends token ids to `{split}_NNNN.bin` shards of exactly `shard_tokens` tokens
    (the last one may be shorter). A shard is written to a temporary name and renamed
    when complete, so a file with the final name is never half-written."""

    def __init__(self, output_dir: Path, split: str, shard_tokens: int, *,
                 register: Callable[[Path], None] = _no_registration):
        self.output_dir, self.split, self.register = output_dir, split, register
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
        self.register(tmp)
        self.register(self.output_dir / name)
        with open(tmp, "wb") as f:
            self.buffer[:self.filled].tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.output_dir / name)
        self.shards.append({"file": name, "tokens": int(self.filled)})
        self.filled = 0

    def close(self) -> None:
        self._flush()


#####################################
# The output folder: publish a new dataset atomically, delete only our own files
#####################################

def _inside(root: Path, relative: str) -> Path | None:
    """`root / relative` if `relative` is a plain relative path that stays inside `root`, else None."""
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return root / path


def dataset_files(metadata: dict) -> list[str]:
    """The files of a dataset, as paths relative to its output folder."""
    return [f["file"] for split in metadata["splits"].values() for f in (*split["shards"], *split["text_files"])]


class DatasetFolder:
    """The output folder of prepare_dataset.py, changed only in ways a kill cannot tear.

    `metadata.json` names the current dataset, whose files lie in a folder
    `dataset-NNNN/`. A new dataset is written into a new such folder and becomes current
    when `metadata.json` is replaced by a rename; after that the old files are deleted.
    `manifest.json` lists every file and folder the script has created here, recorded
    *before* it is created: after a crash, the next run deletes exactly what an earlier
    run left behind, and never a file of the user's.
    """

    def __init__(self, root: Path):
        self.root = root
        self.files: set[str] = set()
        self.folders: set[str] = set()
        manifest = root / MANIFEST
        if manifest.is_file():
            try:
                recorded = json.loads(manifest.read_text(encoding="utf-8"))
                self.files, self.folders = set(recorded["files"]), set(recorded["folders"])
            except (ValueError, KeyError, TypeError):
                warnings.warn(f"{manifest} is damaged: files left by an interrupted run may stay behind",
                              stacklevel=2)

    def _save_manifest(self) -> None:
        tmp = self.root / (MANIFEST + ".tmp")  # the manifest's own temporary file: overwritten, then renamed
        tmp.write_text(json.dumps({"written_by": "prepare_dataset.py", "files": sorted(self.files),
                                   "folders": sorted(self.folders)}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.root / MANIFEST)

    def register(self, path: Path) -> None:
        """Record a file that is about to be created (before it exists, so no crash can orphan it)."""
        relative = path.relative_to(self.root).as_posix()
        if relative not in self.files:
            self.files.add(relative)
            self._save_manifest()

    def current_metadata(self) -> dict | None:
        """The metadata of the current dataset, or None if there is none (or it is unreadable)."""
        try:
            return read_metadata(self.root)
        except (FileNotFoundError, DatasetError):
            return None

    def new_dataset_folder(self) -> Path:
        """Create and record a new, empty `dataset-NNNN` folder (numbered after the existing ones)."""
        number = 1
        while True:
            name = f"dataset-{number:04d}"
            if name not in self.folders and not (self.root / name).exists():
                self.folders.add(name)
                self._save_manifest()
                (self.root / name).mkdir()
                return self.root / name
            number += 1

    def publish(self, metadata: dict) -> None:
        """Make `metadata` (and so its dataset) current with one rename; then delete the old dataset."""
        old = self.current_metadata()
        if old is not None:  # the files an earlier run listed in its metadata are ours to delete
            self.files |= {f for f in dataset_files(old) if _inside(self.root, f)}
            self._save_manifest()
        tmp = self.root / (METADATA + ".tmp")
        self.register(tmp)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(metadata, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / METADATA)
        self.collect_garbage()

    def collect_garbage(self) -> None:
        """Delete the recorded files and folders that the current dataset does not use."""
        current = self.current_metadata()
        if current is None and (self.root / METADATA).exists():
            return  # a metadata.json we cannot read: we cannot tell what is in use, so delete nothing
        keep = set(dataset_files(current)) if current else set()
        keep_folders = {Path(f).parts[0] for f in keep if len(Path(f).parts) > 1}
        for relative in sorted(self.files - keep):
            path = _inside(self.root, relative)
            if path is not None:
                path.unlink(missing_ok=True)
            self.files.discard(relative)
            self._save_manifest()
        for name in sorted(self.folders - keep_folders):
            path = _inside(self.root, name)
            if path is not None and path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            if path is None or not path.exists():
                self.folders.discard(name)
                self._save_manifest()


def check_output_dir(data_dir: Path, output_dir: Path) -> None:
    """Refuse an output folder that would be read back as books, or that cannot be written."""
    data, out = data_dir.resolve(), output_dir.resolve()
    if out == data or data in out.parents:
        raise ValueError(f"--output-dir {output_dir} is inside --data-dir {data_dir}: its text files would be "
                         "read as books by the next run. Choose an output folder outside the data folder.")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file, not a folder. Choose another --output-dir.")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise ValueError(f"--output-dir {output_dir} is not writable ({err.strerror or err}). "
                         "Choose another --output-dir.") from None


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
    paths = sorted(p for p in data_dir.rglob("*") if p.name.endswith(BOOK_SUFFIXES) and not p.is_dir())
    random.Random(seed).shuffle(paths)
    return paths


def _write_books(books, total: int, folder: Path, register, max_size_mb: float, shard_tokens: int,
                 val_fraction: float, progress: bool) -> tuple[dict, list]:
    """Write the processed books into `folder`, each into its split; return (splits, skipped)."""
    splits = {
        split: {"text": TextFileWriter(folder, f"{split}_text_{{:04d}}.txt", int(max_size_mb * 1e6),
                                       register=register),
                "tokens": TokenShardWriter(folder, split, shard_tokens, register=register), "books": []}
        for split in ("train", "val")
    }
    skipped = []
    with tqdm(books, total=total, unit="book", desc="Preparing", disable=not progress) as bar:
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
    return splits, skipped


def _metadata(splits: dict, skipped: list, folder: str, settings: dict) -> dict:
    def in_folder(files: list[dict]) -> list[dict]:
        return [{**f, "file": f"{folder}/{f['file']}"} for f in files]

    return {
        "tokenizer": "gpt2",
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "eot_token": _get_tokenizer().eot_token,
        "format": ("Each book's text is followed by <|endoftext|>; the .bin shards hold the same "
                   "text as GPT-2 token ids, little-endian uint16."),
        "settings": settings,
        "splits": {
            name: {"tokens": sum(s["tokens"] for s in split["tokens"].shards),
                   "shards": in_folder(split["tokens"].shards), "text_files": in_folder(split["text"].files),
                   "books": split["books"]}
            for name, split in splits.items()
        },
        "skipped": skipped,
    }


def prepare(data_dir: Path, output_dir: Path, max_size_mb: float = 500.0, shard_tokens: int = 100_000_000,
            val_fraction: float = 0.1, min_english_share: float = 0.25, seed: int = 123, workers: int = 1,
            parallel: str = "thread", progress: bool = True) -> dict:
    """Process every book of `data_dir` into a new dataset in `output_dir`, make it the current
    one, and return its metadata (also written to `output_dir/metadata.json`).

    With `workers` > 1, books are processed concurrently by a pool of threads (tiktoken
    releases Python's GIL while it tokenizes, which is most of the work) or of processes
    (which also run the Python clean-up in parallel, but cost a start-up per worker).
    A second run on the same `output_dir` at the same time is refused (a lock file).
    """
    from ch05_utils import RunLock  # here, not at the top: worker processes need no PyTorch

    if parallel not in ("thread", "process"):
        raise ValueError(f"parallel must be 'thread' or 'process', got {parallel!r}")
    output_dir, data_dir = Path(output_dir), Path(data_dir)
    check_output_dir(data_dir, output_dir)
    paths = list_books(data_dir, seed)
    if not paths:
        raise FileNotFoundError(f"No .txt files found in {data_dir}. Point --data-dir at the folder of raw books.")
    with RunLock(output_dir):
        folder = DatasetFolder(output_dir)
        folder.collect_garbage()  # what an interrupted run left behind
        new = folder.new_dataset_folder()
        try:
            results = process_in_order(paths, min_english_share, workers, parallel)
            splits, skipped = _write_books(results, len(paths), new, folder.register, max_size_mb, shard_tokens,
                                           val_fraction, progress)
        except BaseException:  # Ctrl-C or an error: the current dataset stays; remove the partial new one
            folder.collect_garbage()
            raise
        settings = {"max_size_mb": max_size_mb, "shard_tokens": shard_tokens, "val_fraction": val_fraction,
                    "min_english_share": min_english_share, "seed": seed}
        metadata = _metadata(splits, skipped, new.name, settings)
        folder.publish(metadata)
    return metadata


#####################################
# Reading a prepared dataset back
#####################################

def read_metadata(output_dir: str | Path) -> dict:
    """The metadata.json of a prepared dataset, checked to have what the readers use."""
    path = Path(output_dir) / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"No {METADATA} in {output_dir}: run prepare_dataset.py first (see README.md).")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is damaged ({err}): run prepare_dataset.py again.") from None
    try:
        np.dtype(metadata["dtype"])
        for split in ("train", "val"):
            info = metadata["splits"][split]
            for entry in (*info["shards"], *info["text_files"]):
                if not isinstance(entry["file"], str) or _inside(Path(output_dir), entry["file"]) is None:
                    raise TypeError(f"a file name that leaves the folder: {entry['file']!r}")
            if not all(isinstance(s["tokens"], int) and s["tokens"] > 0 for s in info["shards"]):
                raise TypeError("a shard without a positive token count")
            info["books"]  # noqa: B018  (only checked to exist)
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"{path} is not the metadata of prepare_dataset.py ({type(err).__name__}: {err}): "
                           "run prepare_dataset.py again.") from None
    return metadata


def load_shards(output_dir: str | Path, split: str) -> list[np.memmap]:
    """Memory-map the token shards of one split (nothing is read until it is used), after
    checking that every shard listed in metadata.json is there with the listed length."""
    output_dir = Path(output_dir)
    metadata = read_metadata(output_dir)
    if split not in metadata["splits"]:
        raise ValueError(f"Unknown split {split!r}; {output_dir / METADATA} has {sorted(metadata['splits'])}.")
    itemsize = np.dtype(metadata["dtype"]).itemsize
    shards = []
    for shard in metadata["splits"][split]["shards"]:
        path = output_dir / shard["file"]
        if not path.is_file():
            raise DatasetError(f"{path} is missing (listed in {METADATA}): the dataset is incomplete; "
                               "run prepare_dataset.py again.")
        size = path.stat().st_size
        if size != shard["tokens"] * itemsize:
            what = ("not a whole number of tokens" if size % itemsize
                    else f"{size // itemsize:,} tokens where {METADATA} lists {shard['tokens']:,}")
            raise DatasetError(f"{path} has {size:,} bytes, {what}: it was truncated or replaced; "
                               "run prepare_dataset.py again.")
        shards.append(np.memmap(path, dtype=metadata["dtype"], mode="r"))
    return shards


def why_split_is_small(metadata: dict, split: str) -> str:
    """What prepare_dataset.py did that left `split` with few or no tokens, and which flag changes it."""
    kept = {name: len(info["books"]) for name, info in metadata["splits"].items()}
    not_english = [s["file"] for s in metadata.get("skipped", []) if s["reason"].startswith("not English")]
    settings = metadata.get("settings", {})
    reasons = []
    if not any(kept.values()):
        reasons.append(f"prepare_dataset.py kept no book (it skipped {len(metadata.get('skipped', []))} file(s))")
    elif split == "train" and kept["train"] == 0:
        reasons.append(f"whole books go to one split, and with --val-fraction {settings.get('val_fraction')} "
                       f"all {kept['val']} kept book(s) went to validation")
        reasons.append("add books" + (", or lower --val-fraction" if kept["val"] > 1 else "")
                       + ", or train on the text files directly with pretraining_simple.py --data-dir "
                       "<folder of .txt files>, which splits every file 90/10 as the course's script does")
    elif split == "val" and kept["val"] == 0:
        reasons.append("no book went to validation: raise --val-fraction above 0")
    if not_english:
        names = ", ".join(not_english[:3]) + (", ..." if len(not_english) > 3 else "")
        reasons.append(f"{len(not_english)} file(s) were skipped as not English ({names}): "
                       "prepare_dataset.py --min-english-share 0 keeps books in any language")
    return "; ".join(reasons)


#####################################
# The course's function: combined text files only
#####################################

def combine_files(file_paths: list, target_dir: str | Path, max_size_mb: float = 500,
                  separator: str = "<|endoftext|>", fallback_encoding: str = "latin1") -> int:
    """The course's `combine_files`: write the English books of `file_paths`, without
    Project Gutenberg's header and footer, into `combined_1.txt`, `combined_2.txt`, ... of
    at most `max_size_mb` each, the books of a file joined by `separator`. Returns the
    number of files written.

    As in the course, a book counts as English if more than 90% of its characters are
    ASCII (`is_english`) and runs of blank lines become one blank line. Decoding and
    stripping are `prepare`'s (`decode_book`, `strip_gutenberg`).
    """
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    writer = TextFileWriter(target_dir, "combined_{}.txt", int(max_size_mb * 1024 * 1024), separator=separator,
                            first_index=1)
    for file_path in tqdm(file_paths):
        content = decode_book(Path(file_path).read_bytes(), fallback_encoding=fallback_encoding)
        if not is_english(content):
            tqdm.write(f"Skipping {file_path} as it does not contain primarily English text.")
            continue
        content = re.sub(r"\n\s*\n", "\n\n", strip_gutenberg(content)[0])
        writer.add(content)
    writer.close()
    return len(writer.files)


#####################################
# Command line
#####################################

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", "--data_dir", type=Path, default=Path("gutenberg/data/raw"),
                        help="Folder with the raw Project Gutenberg .txt files (searched recursively).")
    parser.add_argument("--output-dir", "--output_dir", type=Path, default=Path("gutenberg_preprocessed"),
                        help="Where the dataset goes; must not lie inside --data-dir.")
    parser.add_argument("--max-size-mb", "--max_size_mb", type=float, default=500.0,
                        help="Largest combined text file (MB).")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000,
                        help="Tokens per .bin shard (2 bytes each).")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="Share of the books held out for validation.")
    parser.add_argument("--min-english-share", type=float, default=0.25,
                        help="Keep a book if at least this share of its words are common English words "
                             "(0 keeps every book).")
    parser.add_argument("--seed", type=int, default=123, help="Seed of the book order.")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="Books cleaned and tokenized in parallel.")
    parser.add_argument("--parallel", choices=("thread", "process"), default="thread",
                        help="Run the workers as threads or as processes.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a folder. Download the books first (see README.md).")
    if not (math.isfinite(args.max_size_mb) and args.max_size_mb > 0) or args.shard_tokens < 1 or args.workers < 1:
        parser.error("--max-size-mb, --shard-tokens and --workers must be positive.")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}.")
    if not 0 <= args.min_english_share <= 1:
        parser.error(f"--min-english-share must be in [0, 1], got {args.min_english_share}.")


def main(argv: list[str] | None = None) -> int:
    from ch05_utils import FolderInUseError

    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    try:
        metadata = prepare(args.data_dir, args.output_dir, args.max_size_mb, args.shard_tokens, args.val_fraction,
                           args.min_english_share, args.seed, args.workers, args.parallel,
                           progress=not args.no_progress)
    except (FileNotFoundError, ValueError, FolderInUseError) as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        print(f"\nInterrupted: {args.output_dir / METADATA} and its dataset are unchanged.", file=sys.stderr)
        return 130
    for name, split in metadata["splits"].items():
        print(f"{name}: {len(split['books'])} books, {split['tokens']:,} tokens in {len(split['shards'])} shard(s), "
              f"{len(split['text_files'])} text file(s)")
    print(f"skipped: {len(metadata['skipped'])} file(s); wrote {args.output_dir / METADATA}")
    for split in ("train", "val"):
        if metadata["splits"][split]["tokens"] == 0:
            print(f"warning: the {split} split is empty: {why_split_is_small(metadata, split)}.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
