"""Download OpenAI's GPT-2 weights and load them into the chapter's `GPTModel`.

    settings, params = download_and_load_gpt2("124M", models_dir="gpt2")
    model = GPTModel(config_from_hparams(settings))
    load_weights_into_gpt(model, params)

OpenAI published GPT-2 as TensorFlow checkpoints. This module

1. downloads the seven files of a checkpoint robustly (resume, retries, size and
   SHA-256 checks, a backup mirror, and no network at all once the files are there),
2. reads the checkpoint into NumPy arrays, either with TensorFlow (as the chapter
   does) or with a small reader of TensorFlow's file format written in plain Python,
   so TensorFlow is not needed,
3. copies the arrays into a `GPTModel`, checking every shape.

Sources: OpenAI's storage, then a backup mirror. Set the environment variable
GPT2_BASE_URL (or pass `base_url=`) to use another mirror or a local folder laid out
as `<base>/<model_size>/<file>`.

This file is the canonical copy: `scripts/sync_shared_code.py` copies it into the
other folders of the chapter.
"""

import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

MODEL_SIZES = ("124M", "355M", "774M", "1558M")
FILENAMES = (
    "checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
    "model.ckpt.index", "model.ckpt.meta", "vocab.bpe",
)
BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BACKUP_BASE_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
BASE_URL_ENV = "GPT2_BASE_URL"
RETRY_BACKOFF_S = 1.0  # first wait before retrying a failed download; doubles each time

# SHA-256 digests of OpenAI's files that we could confirm independently (see the
# README): `checkpoint` and `hparams.json` were reproduced byte for byte, encoder.json
# and vocab.bpe are the files tiktoken checks against the same digests, and the 124M
# weights' digest was found in two unrelated public sources, with the known size of
# 497,759,232 bytes. Files without an entry are checked by size (Content-Length).
KNOWN_SHA256 = {
    ("124M", "checkpoint"): "dd1b025d2e155283f5e300ce95bf6d5b6bc0f7fe010db73daa6975eb896ab9cb",
    ("124M", "encoder.json"): "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ("124M", "hparams.json"): "d9d56e4121c427164e0c55c6f03c08e1daf9002b9b672825112d19097b680318",
    ("124M", "model.ckpt.data-00000-of-00001"): "2060c885360cc0cf41d7a6dbc4d24b5127aae20260c8b5ae521b5a6578407118",
    ("124M", "vocab.bpe"): "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

_BASE = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.0, "qkv_bias": True}
GPT2_CONFIGS = {
    "124M": {**_BASE, "emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "355M": {**_BASE, "emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "774M": {**_BASE, "emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "1558M": {**_BASE, "emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}


class ChecksumError(ValueError):
    """A downloaded file does not have the expected SHA-256 digest or size."""


#####################################
# Downloading
#####################################

def download_and_load_gpt2(model_size: str, models_dir: str | Path = "gpt2", base_url: str | None = None,
                           reader: str = "numpy", progress: bool = True) -> tuple[dict, dict]:
    """Download GPT-2 `model_size` into `models_dir/model_size` (once) and read its weights.

    Returns `(settings, params)`: the checkpoint's hparams.json and the weights as a
    nested dict of NumPy arrays (`blocks`, `wte`, `wpe`, `g`, `b`). `reader` is
    "numpy" (TensorFlow-free, the default) or "tensorflow" (the chapter's way).
    """
    if reader not in ("numpy", "tensorflow"):
        raise ValueError(f"Unknown reader {reader!r}: use 'numpy' or 'tensorflow'.")
    model_dir = download_gpt2_files(model_size, models_dir, base_url, progress=progress)
    settings = read_hparams(model_dir / "hparams.json")
    prefix = checkpoint_prefix(model_dir)
    if reader == "tensorflow":
        params = load_gpt2_params_from_tf_ckpt(prefix, settings)
    else:
        params = load_gpt2_params_numpy(prefix, settings)
    return settings, params


def check_model_size(model_size: str) -> None:
    if model_size not in MODEL_SIZES:
        raise ValueError(f"Unknown GPT-2 model size {model_size!r}: choose one of {', '.join(MODEL_SIZES)}.")


def download_gpt2_files(model_size: str, models_dir: str | Path = "gpt2", base_url: str | None = None,
                        progress: bool = True) -> Path:
    """Make sure the seven files of GPT-2 `model_size` are in `models_dir/model_size`.

    Files already there are used without any network access: a file only gets its
    final name after it was downloaded completely and verified. Each missing file is
    tried from each source in turn (OpenAI, then the backup mirror, unless a base URL
    was given).
    """
    check_model_size(model_size)
    model_dir = Path(models_dir) / model_size
    custom_source = base_url or os.environ.get(BASE_URL_ENV)
    sources = [custom_source] if custom_source else [BASE_URL, BACKUP_BASE_URL]
    for filename in FILENAMES:
        destination = model_dir / filename
        if destination.is_file():
            continue
        # Known digests describe OpenAI's files, so they apply to the built-in sources;
        # a source of your own may hold other files (your own model, a test model).
        sha256 = None if custom_source else KNOWN_SHA256.get((model_size, filename))
        errors = []
        for source in sources:
            try:
                download_file(_join(source, model_size, filename), destination, sha256,
                              backoff=RETRY_BACKOFF_S, progress=progress)
                break
            except (ConnectionError, ChecksumError, FileNotFoundError) as err:
                errors.append(str(err))
        else:
            raise ConnectionError(
                f"Could not get {filename} of GPT-2 {model_size}: " + " | ".join(errors) + ". "
                f"Check the internet connection, or set {BASE_URL_ENV} to a mirror or to a local folder "
                f"that holds {model_size}/{filename}."
            )
    return model_dir


def _join(base: str, *parts: str) -> str:
    if _is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(_local_path(base), *parts))


def _is_url(location: str) -> bool:
    return urllib.parse.urlparse(location).scheme in ("http", "https")


def _local_path(location: str) -> Path:
    """A folder or file given as a path or as a file:// URL."""
    if location.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(location).path))
    return Path(location)


def download_file(url: str, destination: str | Path, sha256: str | None = None, retries: int = 4,
                  backoff: float = 1.0, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download `url` (or copy a local path) to `destination`, verified, resuming if possible.

    The bytes go to `destination.part`; an interrupted download is resumed from there
    with an HTTP Range request. The part file is renamed to `destination` only when its
    size matches the server's Content-Length and, if `sha256` is given, its digest
    matches; a corrupt download is deleted, never kept as if complete. Failures are
    retried `retries` times, waiting `backoff`, 2 * `backoff`, 4 * `backoff`, ... seconds.
    If `destination` already exists it is returned at once, without network access.
    """
    if retries < 1:
        raise ValueError(f"retries must be at least 1, got {retries}")
    destination = Path(destination)
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    for attempt in range(1, retries + 1):  # every path through the loop returns, raises or retries
        try:
            if _is_url(url):
                expected_size = _fetch_into(url, part, timeout, progress)
            else:
                expected_size = _copy_into(_local_path(url), part)
            _verify(part, expected_size, sha256, url)
            os.replace(part, destination)
            return destination
        except ChecksumError:
            part.unlink(missing_ok=True)  # corrupt: start from scratch next time
            if attempt == retries:
                raise
        except urllib.error.HTTPError as err:
            if err.code < 500 and err.code not in (408, 416, 429):  # 404 and the like: retrying will not help
                raise ConnectionError(f"{url}: HTTP {err.code} {err.reason}") from None
            if attempt == retries:
                raise ConnectionError(f"{url}: HTTP {err.code} {err.reason} after {retries} attempts") from None
        except (OSError, http.client.HTTPException) as err:
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                part.unlink(missing_ok=True)
                raise OSError(errno.ENOSPC, f"Disk full: {err.strerror}, while downloading {url} to {destination} "
                                            "(the partial file was removed). Free some space or choose another "
                                            "models_dir.") from None
            if isinstance(err, FileNotFoundError):
                raise
            if attempt == retries:
                raise ConnectionError(f"{url}: {err!r} after {retries} attempts") from None
        time.sleep(backoff * 2 ** (attempt - 1))


def _fetch_into(url: str, part: Path, timeout: float, progress: bool) -> int | None:
    """One HTTP request: append to `part` from where it ends. Returns the full file size, if known."""
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # nothing after `start`: the part file may be complete already
            total = err.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == start:
                return start
            part.unlink()  # larger than the file on the server: not the same file, start over
        raise
    with response:
        total = _total_size(response, start)
        if response.status == 200 and start:  # the server ignored the Range header: start over
            start = 0
        _check_free_space(part, None if total is None else total - start)
        with open(part, "ab" if start else "wb") as f, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, desc=part.name[:-len(".part")],
            disable=not progress, leave=False,
        ) as bar:
            while chunk := response.read1(1 << 20):  # whatever has arrived, so a drop loses nothing
                f.write(chunk)
                bar.update(len(chunk))
    return total


def _total_size(response, start: int) -> int | None:
    """The full file size from Content-Range (a resumed, 206 response) or Content-Length."""
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != start:
            raise http.client.HTTPException(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
        return int(match.group(2))
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def _check_free_space(path: Path, needed: int | None) -> None:
    if needed is not None and shutil.disk_usage(path.parent).free < needed:
        raise OSError(errno.ENOSPC, f"{needed:,} bytes are needed in {path.parent} but only "
                                    f"{shutil.disk_usage(path.parent).free:,} are free")


def _copy_into(source: Path, part: Path) -> int:
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    _check_free_space(part, source.stat().st_size)
    shutil.copyfile(source, part)
    return source.stat().st_size


def _verify(part: Path, expected_size: int | None, sha256: str | None, url: str) -> None:
    size = part.stat().st_size
    if expected_size is not None and size < expected_size:
        raise ConnectionError(f"{url}: the connection ended after {size:,} of {expected_size:,} bytes")
    if expected_size is not None and size != expected_size:
        raise ChecksumError(f"{url}: got {size:,} bytes but expected {expected_size:,}")
    if sha256 is not None:
        actual = sha256_of(part)
        if actual != sha256:
            raise ChecksumError(f"{url}: SHA-256 mismatch (expected {sha256}, got {actual}); "
                                "the corrupt download was deleted")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#####################################
# Reading the checkpoint
#####################################

def read_hparams(path: str | Path) -> dict:
    """hparams.json, checked for the five keys GPT-2 needs."""
    settings = json.loads(Path(path).read_text(encoding="utf-8"))
    missing = [k for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer") if k not in settings]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a GPT-2 hparams.json.")
    return settings


def checkpoint_prefix(model_dir: str | Path) -> Path:
    """The checkpoint's path prefix (`.../model.ckpt`), read from the `checkpoint` file like
    TensorFlow's `tf.train.latest_checkpoint` does."""
    model_dir = Path(model_dir)
    text = (model_dir / "checkpoint").read_text(encoding="utf-8")
    match = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', text, re.MULTILINE)
    if not match:
        raise ValueError(f"{model_dir / 'checkpoint'} names no model_checkpoint_path.")
    return model_dir / match.group(1)  # an absolute path stays absolute


def config_from_hparams(settings: dict) -> dict:
    """The `GPTModel` config for a checkpoint's hparams.json (works for any GPT-2 shape)."""
    return {
        "vocab_size": settings["n_vocab"],
        "context_length": settings["n_ctx"],
        "emb_dim": settings["n_embd"],
        "n_heads": settings["n_head"],
        "n_layers": settings["n_layer"],
        "drop_rate": 0.0,
        "qkv_bias": True,
    }


def load_gpt2_params_from_tf_ckpt(ckpt_path: str | Path, settings: dict) -> dict:
    """The chapter's way: read the checkpoint with TensorFlow (imported only here)."""
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError("TensorFlow is not installed. Use reader='numpy', which needs no TensorFlow, "
                          "or `pip install tensorflow-cpu`.") from None
    variables = {name: tf.train.load_variable(str(ckpt_path), name)
                 for name, _ in tf.train.list_variables(str(ckpt_path))}
    return params_from_tf_variables(variables, settings["n_layer"])


def load_gpt2_params_numpy(ckpt_path: str | Path, settings: dict) -> dict:
    """Like `load_gpt2_params_from_tf_ckpt`, without TensorFlow (see `read_tf_checkpoint`)."""
    return params_from_tf_variables(read_tf_checkpoint(ckpt_path), settings["n_layer"])


def params_from_tf_variables(variables: dict[str, np.ndarray], n_layer: int) -> dict:
    """Arrange the checkpoint's flat variables (`model/h0/attn/c_attn/w`, ...) into the
    chapter's nested params dict, checking that each one is there and none is left over."""
    used = set()

    def take(name: str) -> np.ndarray:
        key = f"model/{name}"
        if key not in variables:
            raise ValueError(f"The checkpoint has no tensor {key!r}: the files are incomplete or not "
                             f"a GPT-2 checkpoint with n_layer={n_layer}. Delete the folder and download again.")
        used.add(key)
        array = variables[key]
        # OpenAI stored each linear layer's weight as a 1x1 convolution of shape (1, in, out).
        return array[0] if name.endswith("/w") and array.ndim == 3 else array

    def linear(name: str) -> dict:
        return {"w": take(f"{name}/w"), "b": take(f"{name}/b")}

    def norm(name: str) -> dict:
        return {"g": take(f"{name}/g"), "b": take(f"{name}/b")}

    blocks = [{
        "attn": {"c_attn": linear(f"h{i}/attn/c_attn"), "c_proj": linear(f"h{i}/attn/c_proj")},
        "mlp": {"c_fc": linear(f"h{i}/mlp/c_fc"), "c_proj": linear(f"h{i}/mlp/c_proj")},
        "ln_1": norm(f"h{i}/ln_1"),
        "ln_2": norm(f"h{i}/ln_2"),
    } for i in range(n_layer)]
    params = {"blocks": blocks, "wte": take("wte"), "wpe": take("wpe"), **norm("ln_f")}
    unused = sorted(set(variables) - used)
    if unused:
        raise ValueError(f"The checkpoint has tensors that hparams.json (n_layer={n_layer}) does not "
                         f"account for, e.g. {unused[:3]}: hparams.json and the weights do not match.")
    return params


#####################################
# A TensorFlow-free checkpoint reader
#####################################
# A TensorFlow checkpoint `model.ckpt` is two files. `model.ckpt.data-00000-of-00001`
# holds the raw bytes of every tensor, one after another. `model.ckpt.index` is a
# sorted key -> value table (LevelDB's "SSTable" format) that maps each tensor name to
# a small protocol-buffer record: dtype, shape, and where its bytes are in the data
# file (offset, size) with their CRC-32C checksum. Reading it takes three steps:
# the table's blocks, the protocol-buffer records, the tensors.

_TABLE_MAGIC = 0xDB4775248B80FB57  # the last 8 bytes of every table file
_TF_DTYPES = {  # TensorFlow's DataType enum -> NumPy (little-endian)
    1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?", 17: "<u2", 19: "<f2",
    22: "<u4", 23: "<u8",
}


def read_tf_checkpoint(ckpt_path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a TensorFlow (V2 format) checkpoint, as NumPy arrays, without TensorFlow.

    Each tensor's bytes are checked against the CRC-32C checksum stored in the index,
    as TensorFlow does, so a damaged data file is an error instead of wrong weights.
    """
    prefix = str(ckpt_path)
    index_path = Path(prefix + ".index")
    if not index_path.is_file():
        raise FileNotFoundError(f"No checkpoint index at {index_path}.")
    try:
        table = _read_table(index_path.read_bytes())
        header = _parse_proto(table.pop(b"", b""))
        entries = {key.decode("utf-8"): _parse_entry(value) for key, value in table.items()}
    except (IndexError, struct.error, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{index_path} is corrupt or not a TensorFlow checkpoint index ({err}). "
                         "Delete it and download it again.") from None
    if header.get(2, [0])[0] != 0:
        raise ValueError(f"{index_path} stores big-endian tensors, which this reader does not support.")
    num_shards = header.get(1, [1])[0]

    arrays = {}
    for name, entry in entries.items():
        if entry["slices"]:
            raise ValueError(f"Tensor {name!r} is stored in slices (a partitioned variable), which this "
                             "reader does not support; use reader='tensorflow'.")
        if entry["dtype"] not in _TF_DTYPES:
            raise ValueError(f"Tensor {name!r} has TensorFlow dtype {entry['dtype']}, which this reader "
                             "does not support; use reader='tensorflow'.")
        dtype = np.dtype(_TF_DTYPES[entry["dtype"]])
        data_path = Path(f"{prefix}.data-{entry['shard_id']:05d}-of-{num_shards:05d}")
        if int(np.prod(entry["shape"])) * dtype.itemsize != entry["size"]:
            raise ValueError(f"{index_path} is corrupt: tensor {name!r} of shape {entry['shape']} "
                             f"cannot take {entry['size']} bytes.")
        buffer = bytearray(entry["size"])
        with open(data_path, "rb") as f:
            f.seek(entry["offset"])
            if f.readinto(buffer) != entry["size"]:
                raise ValueError(f"{data_path} is truncated: tensor {name!r} ends after the end of the file. "
                                 "Delete it and download it again.")
        if entry["crc32c"] is not None and _unmask_crc(entry["crc32c"]) != crc32c(buffer):
            raise ValueError(f"{data_path} is corrupt: the bytes of tensor {name!r} fail their CRC-32C check. "
                             "Delete it and download it again.")
        arrays[name] = np.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])
    return arrays


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A base-128 varint (7 bits per byte, low bits first) at `pos`; returns (value, next pos)."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _read_table(data: bytes) -> dict[bytes, bytes]:
    """All key/value pairs of a LevelDB-format table (uncompressed, as TensorFlow writes it).

    The file ends with a 48-byte footer that points to the index block; the index block
    lists the data blocks; each block is followed by a type byte and a masked CRC-32C.
    """
    footer = data[-48:]
    if len(footer) < 48 or struct.unpack("<Q", footer[40:])[0] != _TABLE_MAGIC:
        raise ValueError("the file does not end with the table magic number")
    _, pos = _read_varint(footer, 0)  # metaindex block offset (unused: no filters)
    _, pos = _read_varint(footer, pos)  # metaindex block size
    index_offset, pos = _read_varint(footer, pos)
    index_size, _ = _read_varint(footer, pos)
    entries = {}
    for _, handle in _block_entries(_read_block(data, index_offset, index_size)):
        offset, pos = _read_varint(handle, 0)
        size, _ = _read_varint(handle, pos)
        entries.update(_block_entries(_read_block(data, offset, size)))
    return entries


def _read_block(data: bytes, offset: int, size: int) -> bytes:
    if offset + size + 5 > len(data):
        raise ValueError(f"a block at bytes {offset}..{offset + size} lies beyond the end of the file")
    compression, masked_crc = data[offset + size], struct.unpack_from("<I", data, offset + size + 1)[0]
    if _unmask_crc(masked_crc) != crc32c(data[offset:offset + size + 1]):
        raise ValueError(f"the block at byte {offset} fails its CRC-32C check")
    if compression != 0:
        raise ValueError(f"the block at byte {offset} is compressed (type {compression}), which is not supported")
    return data[offset:offset + size]


def _block_entries(block: bytes):
    """Yield a block's (key, value) pairs. Each key is stored as the number of bytes it
    shares with the previous key plus the bytes that differ; an array of "restart
    points" at the end of the block (its last 4 bytes count them) is not needed here."""
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 * (num_restarts + 1)
    if end < 0:
        raise ValueError("a block's restart array is larger than the block")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _read_varint(block, pos)
        non_shared, pos = _read_varint(block, pos)
        value_length, pos = _read_varint(block, pos)
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + value_length]
        pos += value_length


def _parse_proto(buf: bytes) -> dict[int, list]:
    """Decode a protocol-buffer message into {field number: [values]} (no schema needed):
    varints become ints, length-delimited fields stay bytes, fixed32 becomes an int."""
    fields, pos = {}, 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        wire_type = tag & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire_type == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wire_type == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        else:
            raise ValueError(f"unexpected protocol-buffer wire type {wire_type}")
        fields.setdefault(tag >> 3, []).append(value)
    return fields


def _parse_entry(value: bytes) -> dict:
    """TensorFlow's BundleEntryProto: dtype=1, shape=2 (TensorShapeProto: dim=2, each with
    size=1), shard_id=3, offset=4, size=5, crc32c=6 (fixed32), slices=7. Fields that are
    zero are simply absent from the bytes."""
    fields = _parse_proto(value)
    dims = _parse_proto(fields.get(2, [b""])[0]).get(2, [])
    return {
        "dtype": fields.get(1, [0])[0],
        "shape": [_parse_proto(dim).get(1, [0])[0] for dim in dims],
        "shard_id": fields.get(3, [0])[0],
        "offset": fields.get(4, [0])[0],
        "size": fields.get(5, [0])[0],
        "crc32c": fields.get(6, [None])[0],
        "slices": fields.get(7, []),
    }


# CRC-32C (Castagnoli), the checksum TensorFlow and LevelDB use. The textbook version
# updates a 32-bit state once per byte with a 256-entry table; in Python that is far
# too slow for 500 MB of weights. So `crc32c` cuts the data into 16,384 slices, runs
# one CRC per slice all at once with NumPy (two bytes per step, with a 65,536-entry
# table), and stitches the results together. Stitching works because a CRC is linear:
# running it over n zero bytes is a fixed linear map of its state (`_zeros_operator`).

_CRC_LANES = 16384
_CRC_POLY = 0x82F63B78  # the Castagnoli polynomial, bit-reversed


def _make_crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = (table >> np.uint32(1)) ^ np.where(table & np.uint32(1), np.uint32(_CRC_POLY), np.uint32(0))
    return table


_CRC_TABLE = _make_crc_table()  # state after one byte: table[(state ^ byte) & 0xFF] ^ (state >> 8)
_words = np.arange(65536, dtype=np.uint32)
_after_first_byte = _CRC_TABLE[_words & np.uint32(0xFF)] ^ (_words >> np.uint32(8))
_CRC_TABLE_16 = _CRC_TABLE[_after_first_byte & np.uint32(0xFF)] ^ (_after_first_byte >> np.uint32(8))  # two bytes


def _apply_linear(operator: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Apply a linear map of 32-bit states, given as the images of the 32 single bits."""
    out = np.zeros_like(states)
    for bit in range(32):
        out ^= operator[bit] * ((states >> np.uint32(bit)) & np.uint32(1))
    return out


def _zeros_operator(n: int) -> np.ndarray:
    """The linear map of the CRC state that feeding n zero bytes performs."""
    bits = np.uint32(1) << np.arange(32, dtype=np.uint32)
    power = _CRC_TABLE[bits & np.uint32(0xFF)] ^ (bits >> np.uint32(8))  # one zero byte
    result = bits  # the identity
    while n:  # square-and-multiply
        if n & 1:
            result = _apply_linear(power, result)
        power = _apply_linear(power, power)
        n >>= 1
    return result


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C of `data` (crc32c(b"123456789") == 0xE3069283)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    words_per_lane = len(buf) // (2 * _CRC_LANES)
    body = 2 * _CRC_LANES * words_per_lane  # bytes handled by the lanes; the rest comes after
    state = 0xFFFFFFFF
    if words_per_lane:
        lanes = buf[:body].view("<u2").reshape(_CRC_LANES, words_per_lane)
        states = np.zeros(_CRC_LANES, dtype=np.uint32)  # every lane starts from 0
        low, looked_up = np.empty_like(states), np.empty_like(states)
        for start in range(0, words_per_lane, 512):  # 512 columns at a time, made contiguous
            for column in np.ascontiguousarray(lanes[:, start:start + 512].T):
                np.bitwise_xor(states, column, out=states)
                np.bitwise_and(states, 0xFFFF, out=low)
                np.right_shift(states, 16, out=states)
                np.take(_CRC_TABLE_16, low, out=looked_up)
                np.bitwise_xor(states, looked_up, out=states)
        # Stitch neighbours pairwise: state(A then B) = zeros_map_len(B)(state(A)) ^ state(B).
        operator = _zeros_operator(2 * words_per_lane)
        while len(states) > 1:
            states = _apply_linear(operator, states[0::2]) ^ states[1::2]
            operator = _apply_linear(operator, operator)
        state = int(_apply_linear(operator, np.array([state], dtype=np.uint32))[0] ^ states[0])
    table = _CRC_TABLE.tolist()
    for byte in buf[body:].tobytes():  # the last few bytes, one at a time
        state = table[(state ^ byte) & 0xFF] ^ (state >> 8)
    return state ^ 0xFFFFFFFF


def _unmask_crc(masked: int) -> int:
    """LevelDB and TensorFlow store CRCs 'masked' (rotated plus a constant) so that the
    CRC of data that itself contains CRCs stays well-behaved. This undoes it."""
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


#####################################
# Loading the weights into GPTModel
#####################################

def _assign(param: torch.Tensor | None, array: np.ndarray, name: str) -> None:
    """Copy `array` into `param` in place, after checking the shapes agree."""
    if param is None:
        raise ValueError(f"The model has no parameter for {name}: GPT-2 needs a model built with qkv_bias=True.")
    if tuple(param.shape) != tuple(array.shape):
        raise ValueError(f"Shape mismatch for {name}: the model has {tuple(param.shape)}, the checkpoint has "
                         f"{tuple(array.shape)}. Build the model with config_from_hparams(settings).")
    with torch.no_grad():
        param.copy_(torch.tensor(array))


def load_weights_into_gpt(gpt: torch.nn.Module, params: dict) -> None:
    """Copy OpenAI's GPT-2 weights (`params` from `download_and_load_gpt2`) into `gpt`.

    OpenAI's layers store weights as (in, out) and PyTorch's nn.Linear as (out, in), so
    the weights are transposed; the query, key and value projections are one matrix in
    GPT-2 and three in our model, so it is split in three. The output head shares the
    token-embedding matrix (GPT-2 ties them): same Parameter, no second copy.
    """
    _assign(gpt.pos_emb.weight, params["wpe"], "pos_emb.weight <- wpe")
    _assign(gpt.tok_emb.weight, params["wte"], "tok_emb.weight <- wte")
    if len(params["blocks"]) != len(gpt.trf_blocks):
        raise ValueError(f"The checkpoint has {len(params['blocks'])} transformer blocks, the model "
                         f"{len(gpt.trf_blocks)}. Build the model with config_from_hparams(settings).")
    for i, (block, p) in enumerate(zip(gpt.trf_blocks, params["blocks"], strict=True)):
        name = f"trf_blocks.{i}"
        c_attn = p["attn"]["c_attn"]
        if c_attn["w"].shape[-1] % 3 or c_attn["b"].shape[-1] % 3:
            raise ValueError(f"h{i}/attn/c_attn has shape {c_attn['w'].shape}: its last dimension should "
                             "hold query, key and value, so it must divide by 3.")
        q_w, k_w, v_w = np.split(c_attn["w"], 3, axis=-1)
        q_b, k_b, v_b = np.split(c_attn["b"], 3, axis=-1)
        for layer, w, b, what in ((block.att.W_query, q_w, q_b, "query"), (block.att.W_key, k_w, k_b, "key"),
                                  (block.att.W_value, v_w, v_b, "value")):
            _assign(layer.weight, w.T, f"{name}.att.W_{what} weight <- h{i}/attn/c_attn/w ({what} part)")
            _assign(layer.bias, b, f"{name}.att.W_{what} bias <- h{i}/attn/c_attn/b ({what} part)")
        for layer, source, label in ((block.att.out_proj, p["attn"]["c_proj"], "attn/c_proj"),
                                     (block.ff.layers[0], p["mlp"]["c_fc"], "mlp/c_fc"),
                                     (block.ff.layers[2], p["mlp"]["c_proj"], "mlp/c_proj")):
            _assign(layer.weight, source["w"].T, f"{name} weight <- h{i}/{label}/w")
            _assign(layer.bias, source["b"], f"{name} bias <- h{i}/{label}/b")
        for norm, source, label in ((block.norm1, p["ln_1"], "ln_1"), (block.norm2, p["ln_2"], "ln_2")):
            _assign(norm.scale, source["g"], f"{name} scale <- h{i}/{label}/g")
            _assign(norm.shift, source["b"], f"{name} shift <- h{i}/{label}/b")
    _assign(gpt.final_norm.scale, params["g"], "final_norm.scale <- ln_f/g")
    _assign(gpt.final_norm.shift, params["b"], "final_norm.shift <- ln_f/b")
    gpt.out_head.weight = gpt.tok_emb.weight  # weight tying: one tensor for both
