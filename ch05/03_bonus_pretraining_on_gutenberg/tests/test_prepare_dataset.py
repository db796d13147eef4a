"""Tests of prepare_dataset.py on the 12 real Project Gutenberg books of ../shared/data.

See ../shared/data/SOURCES.md for what each book exercises: wrapped START/END markers
(pg76, pg1661), indented END markers, byte-order marks, CRLF line ends, a latin-1 file
(pg22367) and four books that are not in English (pg2000, pg5318, pg14155, pg22367).
"""

import json
import os
import re
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from prepare_dataset import (
    EOT,
    decode_book,
    english_share,
    is_validation_book,
    load_shards,
    prepare,
    process_book,
    strip_gutenberg,
)

HERE = Path(__file__).resolve().parent.parent
RAW = Path(os.environ.get("CH05_DATA_DIR", HERE.parents[2] / "shared" / "data")) / "gutenberg" / "raw"
pytestmark = pytest.mark.skipif(not RAW.is_dir(), reason=f"no raw Gutenberg books at {RAW}")

# The first and last lines of each book's text proper, read off the raw files by hand.
BOOK_EDGES = {
    "pg76.txt": ("[Illustration: Huckleberry Finn.]", "[Illustration: The end. Yours truly. Huck Finn.]"),
    "pg84.txt": ("Frankenstein;", "lost in darkness and distance."),
    "pg174.txt": ("The Picture of Dorian Gray", "THE END"),
    "pg1342.txt": ("Pride And Prejudice", "her into Derbyshire, had been the means of uniting them."),
    "pg1661.txt": ("The Adventures of Sherlock Holmes", "where I believe that she has met with considerable success."),
    "pg2000.txt": ("El ingenioso hidalgo don Quijote de la Mancha", "Fin"),
    "pg2701.txt": ("MOBY DICK; OR THE WHALE", "orphan."),
    "pg4300.txt": ("[Illustration]", "1914-1921"),
    "pg5200.txt": ("Copyright (C) 2002 David Wyllie.", "first to get up and stretch out her young body."),
    "pg5318.txt": ("Les Précieuses Ridicules", "-----------"),
    "pg14155.txt": ("Gustave Flaubert", "Il vient de recevoir la croix d'honneur."),
    "pg22367.txt": ("DIE VERWANDLUNG", "Tochter als erste sich erhob und ihren jungen Körper dehnte."),
}
NOT_ENGLISH = {"pg2000.txt", "pg5318.txt", "pg14155.txt", "pg22367.txt"}
BOILERPLATE = re.compile(
    r"START OF (THE|THIS) PROJECT GUTENBERG|END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg"
    r"|Project Gutenberg License|gutenberg\.org|\*\*\*|^\s*Produced by |Release Date|Character set encoding"
    r"|\ufeff|\r",
    re.IGNORECASE | re.MULTILINE,
)


def _body(name: str) -> str:
    return strip_gutenberg(decode_book((RAW / name).read_bytes()))[0]


def test_the_sample_is_the_expected_one():
    assert sorted(p.name for p in RAW.glob("*.txt")) == sorted(BOOK_EDGES)


@pytest.mark.parametrize("name", sorted(BOOK_EDGES))
def test_stripping_keeps_the_text_proper_and_nothing_else(name):
    body = _body(name)
    first, last = BOOK_EDGES[name]
    lines = body.split("\n")
    assert lines[0].strip() == first
    assert lines[-1].strip() == last
    assert not BOILERPLATE.search(body), BOILERPLATE.search(body)
    raw_lines = decode_book((RAW / name).read_bytes()).count("\n")
    # the header and licence (about 400 lines) are gone, the rest of the book is not
    assert raw_lines - 600 < body.count("\n") < raw_lines - 300


def test_latin1_file_is_decoded_not_mangled():
    raw = (RAW / "pg22367.txt").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    body = _body("pg22367.txt")
    assert "Gregor Samsa" in body and "ungeheueren Ungeziefer" in body
    assert "\ufffd" not in body


@pytest.mark.parametrize("name", sorted(BOOK_EDGES))
def test_language_filter(name):
    share = english_share(_body(name))
    if name in NOT_ENGLISH:
        assert share < 0.05
    else:
        assert share > 0.35


def test_synthetic_edge_cases(tmp_path):
    """Both marker styles, wrapped and indented markers, BOM, CRLF and a declared charset."""
    older = ("The Project Gutenberg EBook of X\r\nCharacter set encoding: ISO-8859-1\r\n\r\n"
             "*** START OF THIS PROJECT GUTENBERG EBOOK A VERY LONG\r\nTITLE ***\r\n\r\n"
             "Produced by Someone\r\nand friends\r\n\r\nCafé au lait.\r\nThe end.\r\n\r\n"
             "End of the Project Gutenberg EBook of X\r\n\r\n"
             "*** END OF THIS PROJECT GUTENBERG EBOOK A VERY LONG\r\nTITLE ***\r\nLicence.\r\n")
    newer = ("\ufeffThe Project Gutenberg eBook of Y\n\n*** START OF THE PROJECT GUTENBERG EBOOK Y ***\n"
             "Body line.\nNot a marker: *** END OF THE PROJECT GUTENBERG EBOOK Y ***\n"
             "    *** END OF THE PROJECT GUTENBERG EBOOK Y ***\nLicence.\n")
    assert strip_gutenberg(decode_book(older.encode("latin-1"))) == ("Café au lait.\nThe end.", True)
    assert strip_gutenberg(decode_book(newer.encode("utf-8"))) == (
        "Body line.\nNot a marker: *** END OF THE PROJECT GUTENBERG EBOOK Y ***", True)
    assert strip_gutenberg("Just some text.\n") == ("Just some text.", False)


def test_empty_and_unreadable_files_are_skipped_with_a_warning(tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    (data / "good.txt").write_bytes((RAW / "pg5200.txt").read_bytes())
    (data / "empty.txt").write_bytes(b"")
    (data / "only_licence.txt").write_text("*** START OF THE PROJECT GUTENBERG EBOOK Z ***\n\n"
                                           "*** END OF THE PROJECT GUTENBERG EBOOK Z ***\nLicence\n")
    (data / "dangling.txt").symlink_to(tmp_path / "does-not-exist.txt")
    with pytest.warns(UserWarning) as record:
        metadata = prepare(data, tmp_path / "out", progress=False)
    messages = " ".join(str(w.message) for w in record)
    for name in ("empty.txt", "only_licence.txt", "dangling.txt"):
        assert f"skipping {name}" in messages
    reasons = {s["file"]: s["reason"] for s in metadata["skipped"]}
    assert reasons["dangling.txt"].startswith("unreadable")
    assert reasons["empty.txt"].startswith("empty")
    assert [b["file"] for b in metadata["splits"]["val"]["books"]] == ["good.txt"]


def test_validation_books_are_spread_evenly():
    assert [is_validation_book(i, 0.25) for i in range(8)] == [True, False, False, False] * 2
    assert sum(is_validation_book(i, 0.1) for i in range(8)) == 1  # ceil(0.8): at least one
    assert not any(is_validation_book(i, 0.0) for i in range(8))


#####################################
# The whole sample, prepared once
#####################################

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    with pytest.warns(UserWarning):
        metadata = prepare(RAW, out, max_size_mb=2.0, shard_tokens=250_000, val_fraction=0.25, workers=2,
                           progress=False)
    return out, metadata


def test_non_english_books_are_dropped_and_english_kept(prepared):
    _, metadata = prepared
    assert {s["file"] for s in metadata["skipped"]} == NOT_ENGLISH
    assert all(s["reason"].startswith("not English") for s in metadata["skipped"])
    kept = [b["file"] for split in metadata["splits"].values() for b in split["books"]]
    assert sorted(kept) == sorted(set(BOOK_EDGES) - NOT_ENGLISH)


def test_split_is_by_book(prepared):
    out, metadata = prepared
    train = {b["file"] for b in metadata["splits"]["train"]["books"]}
    val = {b["file"] for b in metadata["splits"]["val"]["books"]}
    assert len(val) == 2 and len(train) == 6 and not train & val
    for split, books in (("train", train), ("val", val)):
        text = "".join((out / f["file"]).read_text(encoding="utf-8")
                       for f in metadata["splits"][split]["text_files"])
        for name in BOOK_EDGES:
            assert (_body(name) + EOT in text) == (name in books)


def test_token_shards_decode_to_exactly_the_text(prepared):
    out, metadata = prepared
    tokenizer = tiktoken.get_encoding("gpt2")
    for split, info in metadata["splits"].items():
        shards = load_shards(out, split)
        assert all(isinstance(s, np.memmap) and s.dtype == np.uint16 for s in shards)
        assert [len(s) for s in shards] == [s["tokens"] for s in info["shards"]]
        assert all(len(s) <= 250_000 for s in shards)
        tokens = np.concatenate(shards).tolist()
        assert len(tokens) == info["tokens"] == sum(b["tokens"] for b in info["books"])
        expected = []
        for book in info["books"]:  # in the order they were written
            expected += tokenizer.encode(_body(book["file"])) + [tokenizer.eot_token]
        assert tokens == expected
        text = "".join((out / f["file"]).read_text(encoding="utf-8") for f in info["text_files"])
        assert tokenizer.decode(tokens) == text


def test_text_files_respect_the_maximum_size(prepared):
    out, metadata = prepared
    files = metadata["splits"]["train"]["text_files"]
    assert len(files) > 1
    for f in files:
        size = (out / f["file"]).stat().st_size
        assert size == f["bytes"]
        assert size <= 2_000_000 or f["books"] == 1  # only a single big book may exceed it


def _files_below(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (the lock file aside, which holds a process id), by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".run.lock"}


def test_output_is_deterministic_and_independent_of_workers(prepared, tmp_path):
    out, metadata = prepared
    with pytest.warns(UserWarning):
        again = prepare(RAW, tmp_path / "one", max_size_mb=2.0, shard_tokens=250_000, val_fraction=0.25,
                        workers=1, progress=False)
    with pytest.warns(UserWarning):
        in_processes = prepare(RAW, tmp_path / "p", max_size_mb=2.0, shard_tokens=250_000, val_fraction=0.25,
                               workers=2, parallel="process", progress=False)
    assert in_processes == metadata and again == metadata
    expected = _files_below(out)
    assert "metadata.json" in expected and len(expected) > 5
    assert _files_below(tmp_path / "p") == expected
    assert _files_below(tmp_path / "one") == expected


def test_cli(tmp_path):
    script = HERE / "prepare_dataset.py"
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    ok = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--max-size-mb" in ok.stdout
    bad = subprocess.run([sys.executable, str(script), "--data-dir", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "error: --data-dir" in bad.stderr and "Traceback" not in bad.stderr
    data = tmp_path / "raw"
    data.mkdir()
    (data / "pg5200.txt").write_bytes((RAW / "pg5200.txt").read_bytes())
    (data / "pg5318.txt").write_bytes((RAW / "pg5318.txt").read_bytes())
    run = subprocess.run([sys.executable, str(script), "--data-dir", str(data), "--output-dir", str(tmp_path / "o"),
                          "--workers", "1", "--no-progress"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "warning: skipping pg5318.txt: not English" in run.stderr
    assert "val: 1 books" in run.stdout
    metadata = json.loads((tmp_path / "o" / "metadata.json").read_text())
    assert metadata["splits"]["val"]["books"][0]["file"] == "pg5200.txt"


def test_process_book_reports_tokens_of_the_body():
    book = process_book(RAW / "pg5200.txt", min_english_share=0.25)
    assert book.skip_reason is None and book.text.endswith(EOT)
    assert book.tokens[-1] == 50256 and book.tokens.dtype == np.uint16


def test_benchmark_script(tmp_path, capsys):
    from benchmark_prepare import main as benchmark

    for name in ("pg5200.txt", "pg5318.txt"):
        (tmp_path / name).write_bytes((RAW / name).read_bytes())
    assert benchmark(["--data-dir", str(tmp_path), "--workers", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 worker" in out and "2 threads" in out and "2 processes" in out and "speed-up" in out


def test_workers_keep_the_order_and_a_bounded_number_of_books_in_memory(monkeypatch):
    """The corpus is streamed: books are processed ahead of the writer by at most 2 * workers."""
    import threading

    import prepare_dataset

    started, lock = [], threading.Lock()

    def fake_process_book(path, min_english_share):
        with lock:
            started.append(path)
        return path

    monkeypatch.setattr(prepare_dataset, "process_book", fake_process_book)
    paths = [Path(f"book{i}.txt") for i in range(40)]
    results = prepare_dataset.process_in_order(paths, 0.25, workers=3, parallel="thread")
    for consumed, path in enumerate(results, start=1):
        assert path == paths[consumed - 1]
        time.sleep(0.002)  # a slow writer: the workers must wait for it, not run ahead
        with lock:
            assert len(started) - consumed <= 2 * 3
