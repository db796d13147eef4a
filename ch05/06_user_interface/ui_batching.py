"""Serve many chat sessions with shared forward passes: a small continuous-batching scheduler.

Decoding one sequence reads every weight of the model once per token, and the processor
spends most of that time waiting for memory. Eight sequences that advance together need
the same weights, so one pass over them (a matrix product with eight rows instead of
eight matrix-vector products) gives eight tokens for little more than the price of one.

`Batcher` runs one worker thread that owns a KV cache with a row per running request:

- `submit` validates a request's settings and queues it; it never fails because the
  batch is full (a full batch just makes it wait for a free row).
- At every step boundary the worker admits waiting requests into free rows (reading
  each prompt fills its row of the cache), then advances every running row by one token
  with a single `gpt_kv_cache.decode_rows` call. Each row has its own length, sampling
  settings, random generator and stop condition.
- A request that ends (end-of-text, its token limit, or `cancel()` when the user stops or
  disconnects) leaves at the next step boundary, and its row goes to the next in line.

Every request samples from its own `torch.Generator` seeded with its seed, so it gets the
tokens it would get alone, whoever else is in the batch.
"""

import queue
import secrets
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import math

import torch
from gpt_kv_cache import (
    KVCache,
    decode_rows,
    decode_threads,
    forward_cached,
    inference_weights,
    new_cache,
    sample_next_token,
)
from previous_chapters import GPTModel

_END = object()  # put on a request's queue after its last token


@dataclass
class Request:
    """One reply being generated. Iterate over it for its token ids (blocking);
    `cancel()` makes the worker drop it at the next step."""
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    eos_id: int | None
    tokens: "queue.Queue" = field(default_factory=queue.Queue, repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[int]:
        return self.stream()

    def stream(self, should_stop=lambda: False, poll_s: float = 0.05) -> Iterator[int]:
        """The token ids as they come; stops (and cancels) once `should_stop()` is true."""
        try:
            while True:
                try:
                    item = self.tokens.get(timeout=poll_s)
                except queue.Empty:
                    if should_stop():
                        return
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if should_stop():
                    return
        finally:
            self.cancel()  # a no-op for a finished request; frees the row of an abandoned one


@dataclass
class _Row:
    """A running request and where it stands in its cache row."""
    request: Request
    generator: torch.Generator
    tokens: list[int]      # prompt and reply so far
    length: int = 0        # positions of its cache row filled
    produced: int = 0      # reply tokens sent
    logits: torch.Tensor | None = None  # for its next token


def _check_request(request: Request, vocab_size: int) -> None:
    """Refuse settings that `sample_next_token` cannot use (ValueError naming them)."""
    problems = []
    if not (math.isfinite(request.temperature) and request.temperature >= 0):
        problems.append(f"temperature must be a finite number >= 0, got {request.temperature}")
    if request.top_k is not None and request.top_k < 1:
        problems.append(f"top_k must be >= 1 (or 0/None for all tokens), got {request.top_k}")
    if request.top_p is not None and not (0 < request.top_p <= 1):
        problems.append(f"top_p must be in (0, 1], got {request.top_p}")
    if not 0 <= request.seed < 2**63:
        problems.append(f"seed must be -1 or a whole number >= 0, got {request.seed}")
    if any(not 0 <= t < vocab_size for t in request.prompt_ids):
        problems.append(f"token ids must be between 0 and {vocab_size - 1}")
    if problems:
        raise ValueError("; ".join(problems) + ".")


class Batcher:
    """Generate replies for many requests at once with one model (see the module docstring).

    `max_batch` rows are generated together; `check_settings(request)` may raise to
    refuse a request (the chat apps pass their settings validation). `int8` decodes
    with int8 weights; `packed` lets several rows use oneDNN's weight layout, a second
    copy of the float weights that makes the batched products about twice as fast.
    Steps with several rows compute more than they read, so they use `threads` (default:
    all of PyTorch's); a single row uses `decode_threads()`, like `generate_stream`.
    """

    def __init__(self, model: GPTModel, *, max_batch: int = 8, int8: bool = False, packed: bool = True,
                 threads: int | None = None, check_settings=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch, self.int8, self.packed = model.eval(), max_batch, int8, packed
        self.threads = torch.get_num_threads() if threads is None else threads
        self.one_row_threads = decode_threads()
        self.check_settings = check_settings
        self.context_length = model.pos_emb.num_embeddings
        self.weights = inference_weights(model, int8=int8)  # refuses a model int8 cannot quantize
        self.cache: KVCache | None = None  # allocated on first use
        self.rows: list[_Row] = []
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.closed = False
        self.worker = threading.Thread(target=self._work, name="batcher", daemon=True)
        self.worker.start()

    #####################################
    # The client side
    #####################################

    def submit(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int = -1, eos_id: int | None = None) -> Request:
        """Queue a request; returns it at once (iterate over it for the tokens).

        seed -1 draws a fresh random seed. Raises ValueError for an empty prompt and for
        settings that `check_settings` refuses, and RuntimeError after `close()`.
        """
        if not prompt_ids:
            raise ValueError("The prompt is empty: pass at least one token id.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        seed = seed if seed >= 0 else secrets.randbelow(2**31)
        request = Request(list(prompt_ids), max_new_tokens, temperature, top_k or None, top_p, seed, eos_id)
        _check_request(request, self.model.tok_emb.num_embeddings)
        if self.check_settings is not None:
            self.check_settings(request)
        with self.lock:
            if self.closed:
                raise RuntimeError("The batcher is closed.")
            self.waiting.append(request)
            self.lock.notify()
        return request

    def generate(self, prompt_ids: list[int], max_new_tokens: int, **settings) -> list[int]:
        """Submit a request and wait for its whole reply."""
        return list(self.submit(prompt_ids, max_new_tokens, **settings))

    def close(self) -> None:
        """Stop the worker; requests still waiting or running end now."""
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.worker.join()

    @property
    def busy_rows(self) -> int:
        return len(self.rows)

    #####################################
    # The worker
    #####################################

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.closed and not self.rows and not self.waiting:
                    self.lock.wait()
                if self.closed:
                    break
                admitted = []
                while self.waiting and len(self.rows) + len(admitted) < self.max_batch:
                    admitted.append(self.waiting.popleft())
            with torch.inference_mode():
                for request in admitted:
                    try:
                        self._admit(request)
                    except Exception as err:  # this request fails; the others go on
                        self.rows = [row for row in self.rows if row.request is not request]
                        request.tokens.put(err)
                try:
                    self._advance()
                except Exception as err:  # every running request gets the error, the worker goes on
                    for row in self.rows:
                        row.request.tokens.put(err)
                    self.rows = []
        for request in [row.request for row in self.rows] + list(self.waiting):
            request.tokens.put(_END)

    def _admit(self, request: Request) -> None:
        """Read the prompt into a free row of the cache; its first token is sampled in `_advance`."""
        if self.cache is None:
            self.cache = new_cache(self.model, batch_size=self.max_batch)
        row = _Row(request, torch.Generator(device=self.cache.keys.device).manual_seed(request.seed),
                   list(request.prompt_ids))
        self.rows.append(row)
        self._read_window(row, len(self.rows) - 1)

    def _read_window(self, row: _Row, index: int) -> None:
        """(Re)fill row `index` of the cache with the last context_length tokens of `row`."""
        window = row.tokens[-self.context_length:]
        view = self.cache.rows(index, index + 1)
        ids = torch.tensor([window], device=self.cache.keys.device)
        row.logits = forward_cached(self.weights, ids, view, last_only=True)
        row.length = len(window)

    def _advance(self) -> None:
        """Sample each row's next token, drop the rows that ended, then run one step for the rest."""
        for row in self.rows:
            request = row.request
            token = None
            if not request.cancelled.is_set():
                token = sample_next_token(row.logits, request.temperature, request.top_k, request.top_p,
                                          row.generator).item()
            if token is None or token == request.eos_id:
                row.produced = request.max_new_tokens  # ends now
                continue
            request.tokens.put(token)
            row.tokens.append(token)
            row.produced += 1
        self._drop_finished()
        if not self.rows:
            return
        full = [i for i, row in enumerate(self.rows) if row.length == self.context_length]
        for i in full:  # the window slides, as in generate_stream: re-read the last context_length tokens
            self._read_window(self.rows[i], i)
        stepping = [i for i in range(len(self.rows)) if i not in full]
        if len(stepping) == len(self.rows):
            self._step_all()
        else:
            for i in stepping:
                self._step_range(i, i + 1)

    def _step_all(self) -> None:
        self._step_range(0, len(self.rows))

    def _step_range(self, start: int, stop: int) -> None:
        """One decoding step for rows start..stop-1 (their caches are contiguous)."""
        rows = self.rows[start:stop]
        torch.set_num_threads(self.threads if len(rows) > 1 and not self.int8 else self.one_row_threads)
        device = self.cache.keys.device
        token_ids = torch.tensor([row.tokens[-1] for row in rows], device=device)
        positions = torch.tensor([row.length for row in rows], device=device)
        weights = self.weights
        if len(rows) > 1 and self.packed and not self.int8:
            weights = inference_weights(self.model, packed=True)
        if len(rows) > 1 and self.int8:  # int8 rows run one by one through the compiled step
            logits = torch.cat([decode_rows(weights, token_ids[i:i + 1], positions[i:i + 1],
                                            self.cache.rows(start + i, start + i + 1)) for i in range(len(rows))])
        else:
            logits = decode_rows(weights, token_ids, positions, self.cache.rows(start, stop))
        for i, row in enumerate(rows):
            row.logits, row.length = logits[i:i + 1], row.length + 1

    def _drop_finished(self) -> None:
        """Remove rows whose request ended; the last rows move into the gaps so the
        running rows stay at the front of the cache (one row copy per departure)."""
        i = 0
        while i < len(self.rows):
            row = self.rows[i]
            if row.produced < row.request.max_new_tokens:
                i += 1
                continue
            row.request.tokens.put(_END)
            last = len(self.rows) - 1
            if i != last:
                moved = self.rows[last]
                span = moved.length
                self.cache.keys[:, i, :, :span] = self.cache.keys[:, last, :, :span]
                self.cache.values[:, i, :, :span] = self.cache.values[:, last, :, :span]
                self.rows[i] = moved
            self.rows.pop()
