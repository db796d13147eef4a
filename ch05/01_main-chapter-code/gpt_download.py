"""Download OpenAI's GPT-2 weights and read them for the chapter's `GPTModel`.

    settings, params = download_and_load_gpt2(model_size="124M", models_dir="gpt2")
    gpt = GPTModel(config_from_hparams(settings))
    load_weights_into_gpt(gpt, params)     # from previous_chapters.py (or from here)

Each file is downloaded once (resumed, retried, else from the backup mirror) and gets
its final name only once verified. GPT2_BASE_URL (or `base_url=`) points the download at
another mirror or a local folder laid out as `<base>/<model_size>/<file>`. The weights
are read by `tf_checkpoint_reader.py` when it sits beside this file, else by TensorFlow.

Shared file. The canonical copy is ch05/01_main-chapter-code/gpt_download.py;
`make sync` (scripts/sync_shared_code.py) overwrites the copies in the other ch05
folders with it, so edit the canonical file, never a copy.
"""
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from previous_chapters import assign, load_weights_into_gpt  # noqa: F401  (the book imports them from here)

MODEL_SIZES = ("124M", "355M", "774M", "1558M")
FILENAMES = (
    "checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
    "model.ckpt.index", "model.ckpt.meta", "vocab.bpe",
)
BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BACKUP_BASE_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
BASE_URL_ENV = "GPT2_BASE_URL"
RETRY_BACKOFF_S = 1.0  # first wait before retrying a failed download; doubles each time

# SHA-256 digests of OpenAI's files that we could confirm independently (see the README).
KNOWN_SHA256 = {
    ("124M", "checkpoint"): "dd1b025d2e155283f5e300ce95bf6d5b6bc0f7fe010db73daa6975eb896ab9cb",
    ("124M", "encoder.json"): "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ("124M", "hparams.json"): "d9d56e4121c427164e0c55c6f03c08e1daf9002b9b672825112d19097b680318",
    ("124M", "model.ckpt.data-00000-of-00001"): "2060c885360cc0cf41d7a6dbc4d24b5127aae20260c8b5ae521b5a6578407118",
    ("124M", "vocab.bpe"): "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# Sizes the course's own tests check on both servers; used when a server sends none.
_SIZES_124M_355M = {"checkpoint": (77, 77), "encoder.json": (1042301, 1042301), "hparams.json": (90, 91),
                    "model.ckpt.data-00000-of-00001": (497759232, 1419292672), "model.ckpt.index": (5215, 10399),
                    "model.ckpt.meta": (471155, 926519), "vocab.bpe": (456318, 456318)}
KNOWN_SIZES = {(model_size, name): sizes[i] for name, sizes in _SIZES_124M_355M.items()
               for i, model_size in enumerate(("124M", "355M"))}

_BASE = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.0, "qkv_bias": True}
GPT2_CONFIGS = {
    "124M": {**_BASE, "emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "355M": {**_BASE, "emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "774M": {**_BASE, "emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "1558M": {**_BASE, "emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}


class ChecksumError(ValueError):
    """A downloaded file does not have the expected SHA-256 digest, size or format."""


def download_and_load_gpt2(model_size: str, models_dir: str | Path, *, base_url: str | None = None,
                           reader: str | None = None, progress: bool = True) -> tuple[dict, dict]:
    """Download GPT-2 `model_size` into `models_dir/model_size` (once) and read its weights.

    Returns `(settings, params)`: hparams.json and the weights as a nested dict of NumPy
    arrays (`blocks`, `wte`, `wpe`, `g`, `b`), as in the book. `reader` is "numpy"
    (tf_checkpoint_reader.py, no TensorFlow) or "tensorflow"; by default the first if
    that file is here. A file found damaged while reading is renamed `<name>.corrupt`
    (nothing is deleted), so the next call downloads it again.
    """
    reader = reader or ("numpy" if (Path(__file__).parent / "tf_checkpoint_reader.py").is_file() else "tensorflow")
    if reader not in ("numpy", "tensorflow"):
        raise ValueError(f"Unknown reader {reader!r}: use 'numpy' or 'tensorflow'.")
    model_dir = download_gpt2_files(model_size, models_dir, base_url=base_url, progress=progress)
    load = load_gpt2_params_numpy if reader == "numpy" else load_gpt2_params_from_tf_ckpt
    try:
        settings = read_hparams(model_dir / "hparams.json")
        return settings, load(checkpoint_prefix(model_dir), settings)
    except ValueError as err:
        damaged = getattr(err, "path", None)  # DamagedFileError, tf_checkpoint_reader.CorruptCheckpointError
        if damaged is None:
            raise
        corrupt = damaged.with_name(damaged.name + ".corrupt")
        os.replace(damaged, corrupt)
        raise ValueError(f"{err} It was renamed to {corrupt.name}; run again to download it anew.") from None


# Downloading: each file is verified before it gets its final name.

def download_gpt2_files(model_size: str, models_dir: str | Path = "gpt2", *, base_url: str | None = None,
                        progress: bool = True) -> Path:
    """Make sure the seven files of GPT-2 `model_size` are in `models_dir/model_size`.

    Files already there are used without any network access. Each missing file comes
    from OpenAI, else the backup mirror (or only from `base_url`/GPT2_BASE_URL if set).
    """
    if model_size not in MODEL_SIZES:
        raise ValueError(f"Unknown GPT-2 model size {model_size!r}: choose one of {', '.join(MODEL_SIZES)}.")
    model_dir = Path(models_dir) / model_size
    custom_source = base_url or os.environ.get(BASE_URL_ENV)
    for filename in FILENAMES:
        if (model_dir / filename).is_file():
            continue
        if custom_source:  # a mirror of your own may hold other files (your model, a test model)
            url, backup_url, sha256, size = _join(custom_source, model_size, filename), None, None, None
        else:
            url, backup_url = _join(BASE_URL, model_size, filename), _join(BACKUP_BASE_URL, model_size, filename)
            sha256, size = KNOWN_SHA256.get((model_size, filename)), KNOWN_SIZES.get((model_size, filename))
        try:
            download_file(url, model_dir / filename, backup_url, sha256=sha256, size=size,
                          backoff=RETRY_BACKOFF_S, progress=progress)
        except (ConnectionError, ChecksumError) as err:
            raise ConnectionError(f"Could not get {filename} of GPT-2 {model_size}: {err}. Check the internet "
                                  f"connection, or set {BASE_URL_ENV} to a mirror or to a local folder that "
                                  f"holds {model_size}/{filename}.") from None
    return model_dir


def _join(base: str, *parts: str) -> str:
    """`base/part/...` as a URL; a local folder (path or file:// URL) becomes a file:// URL."""
    if urllib.parse.urlparse(base).scheme not in ("http", "https", "file"):
        base = Path(base).resolve().as_uri()
    return "/".join([base.rstrip("/"), *(urllib.parse.quote(part) for part in parts)])


def download_file(url: str, destination: str | Path, backup_url: str | None = None, *,
                  sha256: str | None = None, size: int | None = None, retries: int = 4, backoff: float = 1.0,
                  timeout: float = 60.0, progress: bool = True) -> Path:
    """Download `url` (else `backup_url`) to `destination`, verified, resuming if possible.

    As in the book, `backup_url` is tried when `url` fails. Unlike the book's version, a
    failure raises (ConnectionError, naming both URLs) instead of printing, and a file
    is kept under its final name only once verified: its size must match the server's
    (or `size`), its digest `sha256` if given, and a `.json` file must parse. If
    `destination` already exists it is returned at once, without network access.
    """
    if retries < 1:
        raise ValueError(f"retries must be at least 1, got {retries}")
    destination = Path(destination)
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for source in [url] + ([backup_url] if backup_url else []):
        if errors:
            print(f"Primary URL ({url}) failed: {errors[0]}. Trying the backup URL {backup_url}.")
        try:
            return _download_with_retries(source, destination, sha256, size, retries, backoff, timeout, progress)
        except (ConnectionError, ChecksumError) as err:
            if backup_url is None:
                raise
            errors.append(str(err))
    raise ConnectionError(" | ".join(errors))


def _download_with_retries(url: str, destination: Path, sha256: str | None, size: int | None, retries: int,
                           backoff: float, timeout: float, progress: bool) -> Path:
    """Fetch into `destination.part` (resuming it with HTTP Range requests), verify, rename.

    Failures are retried `retries` times, waiting `backoff`, 2 * `backoff`, ... seconds;
    a download that fails verification is deleted and started from scratch.
    """
    part = destination.with_name(destination.name + ".part")
    for attempt in range(1, retries + 1):  # every path through the loop returns, raises or retries
        try:
            server_size = _fetch_into(url, part, timeout, progress)
            _verify(part, server_size if server_size is not None else size, sha256, url)
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
                                            "(partial file removed). Free some space or choose another models_dir."
                              ) from None
            if isinstance(getattr(err, "reason", err), FileNotFoundError) or attempt == retries:
                raise ConnectionError(f"{url}: {err} (after {attempt} attempts)") from None
        time.sleep(backoff * 2 ** (attempt - 1))


def _fetch_into(url: str, part: Path, timeout: float, progress: bool) -> int | None:
    """One request: append to `part` from where it ends. Returns the full file size, if known."""
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
        if response.status == 206:  # the rest of the file, from `start`
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != start:
                raise http.client.HTTPException(f"unexpected Content-Range {response.headers['Content-Range']!r}")
            total = int(match.group(2))
        else:  # the whole file (a server that ignores Range, or a local file): start over
            start, length = 0, response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        free = shutil.disk_usage(part.parent).free
        if total is not None and free < total - start:  # fail before a long download that cannot fit
            raise OSError(errno.ENOSPC, f"{total - start:,} bytes are needed in {part.parent} but only {free:,} "
                                        "are free")
        with open(part, "ab" if start else "wb") as f, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, desc=part.name[:-len(".part")],
            disable=not progress, leave=False,
        ) as bar:
            while chunk := response.read1(1 << 20):  # whatever has arrived, so a drop loses nothing
                f.write(chunk)
                bar.update(len(chunk))
    return total


def _verify(part: Path, expected_size: int | None, sha256: str | None, url: str) -> None:
    """Size (a short file is a dropped connection, worth resuming), digest, and JSON syntax."""
    size = part.stat().st_size
    if expected_size is not None and size < expected_size:
        raise ConnectionError(f"{url}: the connection ended after {size:,} of {expected_size:,} bytes")
    if expected_size is not None and size != expected_size:
        raise ChecksumError(f"{url}: got {size:,} bytes but expected {expected_size:,}")
    if sha256 is not None and sha256_of(part) != sha256:
        raise ChecksumError(f"{url}: SHA-256 mismatch (expected {sha256}); the corrupt download was deleted")
    if url.endswith(".json"):
        try:
            json.loads(part.read_bytes())
        except ValueError:
            raise ChecksumError(f"{url}: the file is not valid JSON (cut short?); it was deleted") from None


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Reading the checkpoint

class DamagedFileError(ValueError):
    """A downloaded file turned out to be damaged when read; `path` names it."""

    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path = path


def read_hparams(path: str | Path) -> dict:
    """hparams.json, checked for the five keys GPT-2 needs."""
    path = Path(path)
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedFileError(path, f"{path} is not valid JSON ({err}).") from None
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
    return {"vocab_size": settings["n_vocab"], "context_length": settings["n_ctx"], "emb_dim": settings["n_embd"],
            "n_heads": settings["n_head"], "n_layers": settings["n_layer"], "drop_rate": 0.0, "qkv_bias": True}


def load_gpt2_params_from_tf_ckpt(ckpt_path: str | Path, settings: dict) -> dict:
    """The book's way: read every variable of the checkpoint with TensorFlow."""
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError("TensorFlow is not installed. Use reader='numpy' (needs tf_checkpoint_reader.py "
                          "beside gpt_download.py), or `pip install tensorflow-cpu`.") from None
    variables = {name: tf.train.load_variable(str(ckpt_path), name)
                 for name, _ in tf.train.list_variables(str(ckpt_path))}
    return params_from_tf_variables(variables, settings["n_layer"])


def load_gpt2_params_numpy(ckpt_path: str | Path, settings: dict) -> dict:
    """Like `load_gpt2_params_from_tf_ckpt`, with the TensorFlow-free reader."""
    from tf_checkpoint_reader import read_tf_checkpoint

    return params_from_tf_variables(read_tf_checkpoint(ckpt_path), settings["n_layer"])


_BLOCK_TENSORS = [f"{layer}/{p}" for layer in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
                  for p in ("w", "b")] + [f"{norm}/{p}" for norm in ("ln_1", "ln_2") for p in ("g", "b")]


def params_from_tf_variables(variables: dict[str, np.ndarray], n_layer: int) -> dict:
    """Nest the checkpoint's flat variables as the book does: `model/h0/attn/c_attn/w`
    becomes params["blocks"][0]["attn"]["c_attn"]["w"], and `model/ln_f/g` params["g"].

    OpenAI stored each linear layer as a 1x1 convolution of shape (1, in, out); squeezing
    drops the 1. Every tensor GPT-2 needs must be there, and nothing else.
    """
    expected = {"model/wte", "model/wpe", "model/ln_f/g", "model/ln_f/b"}
    expected |= {f"model/h{i}/{name}" for i in range(n_layer) for name in _BLOCK_TENSORS}
    missing, extra = sorted(expected - set(variables)), sorted(set(variables) - expected)
    if missing or extra:
        raise ValueError(f"The checkpoint does not match a GPT-2 with n_layer={n_layer} (hparams.json): "
                         f"missing {missing[:3]}, unexpected {extra[:3]}. Delete the folder and download again.")
    params = {"blocks": [{} for _ in range(n_layer)]}
    for name, array in variables.items():
        parts = name.split("/")[1:]  # without the "model/" prefix
        target = params["blocks"][int(parts[0][1:])] if parts[0].startswith("h") else params
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = np.squeeze(array)
    return params
