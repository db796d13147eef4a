"""A tiny stand-in for OpenAI's GPT-2 release, and a local server for it, for offline tests.

`write_openai_checkpoint` builds a small random `transformers` GPT2LMHeadModel and writes
it exactly the way OpenAI published GPT-2: a TensorFlow (V2) checkpoint saved with
`tf.compat.v1.train.Saver`, variable names such as `model/h0/attn/c_attn/w` with OpenAI's
shapes (the leading 1 of the Conv1D weights included), `hparams.json`, `checkpoint`,
and the real `encoder.json` / `vocab.bpe` from the offline tiktoken cache.

`GPT2TestServer` serves such a folder over HTTP on 127.0.0.1 as `<base_url>/<size>/<file>`
for every GPT-2 size, supports Range requests, and can inject faults per file.
"""

import http.server
import json
import os
import shutil
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
# tiktoken names its cache files by the sha1 of the URL (see ../shared/data/SOURCES.md).
TIKTOKEN_FILES = {
    "encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
    "vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
}
MODEL_SIZES = ("124M", "355M", "774M", "1558M")
TINY_HPARAMS = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 48, "n_head": 4, "n_layer": 2}


def tiktoken_cache_dir() -> Path:
    return Path(os.environ.get("TIKTOKEN_CACHE_DIR", SHARED_DATA / "tiktoken-cache"))


def make_hf_model(hparams: dict = TINY_HPARAMS, seed: int = 0):
    """A random GPT2LMHeadModel of the given shape, in eval mode.

    Every parameter (biases and layer norms included) gets random values of a useful
    size, so that any weight copied to the wrong place changes the logits.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"], n_embd=hparams["n_embd"],
        n_layer=hparams["n_layer"], n_head=hparams["n_head"], activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.2)
    return model.eval()


def openai_variables(hf_model) -> dict[str, np.ndarray]:
    """The HF model's weights under OpenAI's TF names and shapes (Conv1D weights as (1, in, out))."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    variables = {"model/wte": sd["transformer.wte.weight"], "model/wpe": sd["transformer.wpe.weight"],
                 "model/ln_f/g": sd["transformer.ln_f.weight"], "model/ln_f/b": sd["transformer.ln_f.bias"]}
    for i in range(hf_model.config.n_layer):
        hf = f"transformer.h.{i}."
        for ours, theirs in (("attn/c_attn", "attn.c_attn"), ("attn/c_proj", "attn.c_proj"),
                             ("mlp/c_fc", "mlp.c_fc"), ("mlp/c_proj", "mlp.c_proj")):
            variables[f"model/h{i}/{ours}/w"] = sd[hf + theirs + ".weight"][None]  # HF Conv1D is (in, out)
            variables[f"model/h{i}/{ours}/b"] = sd[hf + theirs + ".bias"]
        for ln in ("ln_1", "ln_2"):
            variables[f"model/h{i}/{ln}/g"] = sd[hf + ln + ".weight"]
            variables[f"model/h{i}/{ln}/b"] = sd[hf + ln + ".bias"]
    return variables


def write_tf_checkpoint(variables: dict[str, np.ndarray], folder: Path) -> None:
    """Save `variables` as OpenAI did: a tf.compat.v1 graph, a Saver, `model.ckpt`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf_vars = {name: tf.compat.v1.get_variable(name, shape=array.shape, dtype=tf.float32,
                                                   initializer=tf.compat.v1.zeros_initializer())
                   for name, array in variables.items()}
        placeholders = {name: tf.compat.v1.placeholder(tf.float32, array.shape) for name, array in variables.items()}
        assign = tf.group(*[tf_vars[n].assign(placeholders[n]) for n in variables])
        saver = tf.compat.v1.train.Saver(var_list=tf_vars, save_relative_paths=True)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(assign, feed_dict={placeholders[n]: a for n, a in variables.items()})
            saver.save(sess, str(folder / "model.ckpt"))


def write_openai_checkpoint(folder: Path, hparams: dict = TINY_HPARAMS, seed: int = 0):
    """Write a tiny GPT-2 in OpenAI's layout into `folder`; returns the HF reference model."""
    folder.mkdir(parents=True, exist_ok=True)
    hf_model = make_hf_model(hparams, seed)
    write_tf_checkpoint(openai_variables(hf_model), folder)
    (folder / "hparams.json").write_text(json.dumps(hparams, indent=2) + "\n")
    for name, cached in TIKTOKEN_FILES.items():
        shutil.copyfile(tiktoken_cache_dir() / cached, folder / name)
    return hf_model


#####################################
# A local HTTP server with faults
#####################################

FAULTS = ("drop", "500", "truncate", "corrupt")


@dataclass
class GPT2TestServer:
    """Serves `folder`'s files as `/<any GPT-2 size>/<file>` on 127.0.0.1.

    `faults[filename]` is a list of faults consumed one per request for that file:
    "drop" (reset the connection half-way), "500" (an internal server error),
    "truncate" (a clean close half-way, short of Content-Length), "truncate-nolength"
    (no Content-Length header, then a clean close half-way), "corrupt" (flip a byte in
    the middle). `requests` logs (filename, Range header, status) per request.
    """
    folder: Path
    faults: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)

    def __post_init__(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                server._handle(self)

        class QuietServer(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # injected faults break connections
                pass

        self._httpd = QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handle(self, handler) -> None:
        parts = handler.path.strip("/").split("/")
        range_header = handler.headers.get("Range")
        path = self.folder / parts[-1]
        if len(parts) != 2 or parts[0] not in MODEL_SIZES or not path.is_file():
            self.requests.append((parts[-1], range_header, 404))
            handler.send_error(404)
            return
        queue = self.faults.get(parts[1], [])
        fault = queue.pop(0) if queue else None
        if fault == "500":
            self.requests.append((parts[1], range_header, 500))
            handler.send_error(500)
            return
        data = path.read_bytes()
        start = int(range_header.removeprefix("bytes=").rstrip("-")) if range_header else 0
        if start >= len(data) > 0:
            self.requests.append((parts[1], range_header, 416))
            handler.send_response(416)
            handler.send_header("Content-Range", f"bytes */{len(data)}")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        status = 206 if range_header else 200
        self.requests.append((parts[1], range_header, status))
        body = data[start:]
        handler.send_response(status)
        if fault != "truncate-nolength":
            handler.send_header("Content-Length", str(len(body)))
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Accept-Ranges", "bytes")
        handler.end_headers()
        if fault == "corrupt":
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]
        if fault in ("drop", "truncate", "truncate-nolength"):
            handler.wfile.write(body[:len(body) // 2])
            handler.wfile.flush()
            if fault == "drop":  # SO_LINGER 0: close with a TCP reset instead of a clean FIN
                time.sleep(0.2)  # a reset discards what the client has not read yet: let it read
                handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.close_connection = True
            handler.connection.close()
            return
        handler.wfile.write(body)


@dataclass
class TinyGPT2:
    """A tiny GPT-2 written in OpenAI's layout and served on 127.0.0.1 (see `start_tiny_gpt2`)."""
    folder: Path  # the checkpoint's seven files
    hf_model: object  # the transformers GPT2LMHeadModel it was made from (the reference)
    hparams: dict
    server: GPT2TestServer

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def checkpoint_prefix(self) -> Path:
        return self.folder / "model.ckpt"


def start_tiny_gpt2(folder: Path, hparams: dict = TINY_HPARAMS, seed: int = 0) -> TinyGPT2:
    """Write the tiny GPT-2 into `folder` and serve it; call `.server.stop()` when done."""
    hf_model = write_openai_checkpoint(folder, hparams, seed)
    return TinyGPT2(folder, hf_model, dict(hparams), GPT2TestServer(folder))
