"""How fast does the chat app generate? Tokens per second, greedy, one sequence.

    python ui_generation_benchmark.py                          # 124M shape, 200 new tokens
    python ui_generation_benchmark.py --model 1558M --new-tokens 20 --no-transformers
    python ui_generation_benchmark.py --profile                # where a plain decoding step spends its time
    python ui_generation_benchmark.py --breakdown              # read speed of the compiled step's parts
    python ui_generation_benchmark.py --model tiny --new-tokens 20 --repeats 1

Compares, with the same random weights (untied output head, as `load_weights_into_gpt`
gives) in the same process, taking turns round after round:
  - ours, KV cache: `gpt_kv_cache.generate_stream`, what the apps use (compiled step),
  - ours, KV cache, int8: the same with int8 weights (`int8=True`),
  - ours, KV cache, plain PyTorch: the same step without torch.compile,
  - Hugging Face `transformers`' `GPT2LMHeadModel.generate` (its own KV cache),
  - with --uncached: the chapter's `generate` (a full forward pass per token; slow).

Decoding one sequence is bound by memory bandwidth: every new token reads every weight
once. The script measures how fast this machine reads memory with the same number of
threads, for as long as one of our generation runs takes, and prints each result as a
fraction of the resulting ceiling, tokens/s <= bandwidth / bytes of float32 weights read
per token (int8 reads a quarter of those bytes, so it can pass the ceiling).
"""

import argparse
import sys
import time

import torch
from gpt_kv_cache import (
    GPTModelKV,
    compile_enabled,
    decode_rows,
    decode_threads,
    forward_cached,
    generate_stream,
    inference_weights,
)
from previous_chapters import GPT_CONFIG_124M, GPTModel, generate, get_tokenizer

BENCHMARK_CONFIGS = {
    # OpenAI's GPT-2 small and XL: the shapes app_orig.py runs (1024 positions, biased q/k/v).
    "124M": {**GPT_CONFIG_124M, "context_length": 1024, "qkv_bias": True, "drop_rate": 0.0},
    "1558M": {**GPT_CONFIG_124M, "context_length": 1024, "emb_dim": 1600, "n_heads": 25, "n_layers": 48,
              "qkv_bias": True, "drop_rate": 0.0},
    "tiny": {**GPT_CONFIG_124M, "context_length": 256, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
             "qkv_bias": True, "drop_rate": 0.0},
}
BASELINE = "ours, KV cache"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(BENCHMARK_CONFIGS), default="124M", help="Model shape.")
    parser.add_argument("--new-tokens", type=int, default=200, help="Tokens to generate per run.")
    parser.add_argument("--prompt", default="Every effort moves you", help="Prompt to continue.")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Rounds in which every method runs once (the best time of each counts).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: what gpt_kv_cache picks for decoding).")
    parser.add_argument("--uncached", action="store_true", help="Also run the chapter's generate (slow).")
    parser.add_argument("--no-transformers", action="store_true", help="Skip the transformers comparison.")
    parser.add_argument("--no-plain", action="store_true", help="Skip the run without torch.compile.")
    parser.add_argument("--no-int8", action="store_true", help="Skip the int8 run.")
    parser.add_argument("--profile", action="store_true",
                        help="Only profile plain (uncompiled) one-token steps with torch.profiler and print "
                             "where the time goes.")
    parser.add_argument("--breakdown", action="store_true",
                        help="Only time the compiled step's parts (output head, transformer blocks), float32 "
                             "and int8, against the speed of a sum.")
    parser.add_argument("--seed", type=int, default=123, help="Seed of the random weights.")
    return parser


def check_args(args: argparse.Namespace, cfg: dict, prompt_len: int) -> str | None:
    """The problem with the arguments, or None."""
    if args.new_tokens < 1 or args.repeats < 1:
        return "--new-tokens and --repeats must be at least 1."
    if args.threads is not None and args.threads < 1:
        return f"--threads must be at least 1, got {args.threads}."
    if not prompt_len or prompt_len + args.new_tokens > cfg["context_length"]:
        return (f"the prompt ({prompt_len} tokens) plus --new-tokens must fit the context length "
                f"{cfg['context_length']} and the prompt must not be empty.")
    return None


def build_model(cfg: dict, seed: int) -> GPTModelKV:
    """Random weights, quickly: built on the meta device, then filled with N(0, 0.02^2)
    (GPT-2's initialization scale) and unit layer norms; the head is its own tensor."""
    with torch.device("meta"):
        model = GPTModelKV(cfg)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(".att.mask"):
                tensor.copy_(torch.triu(torch.ones_like(tensor), diagonal=1))
            elif name.endswith(".scale"):
                tensor.fill_(1.0)
            elif name.endswith((".shift", ".bias")):
                tensor.zero_()
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def to_transformers(model: GPTModel):
    """The same weights in a `transformers` GPT2LMHeadModel.

    Its Conv1D layers store weights as (in, out), the transpose of nn.Linear, and it
    computes query, key and value with one matrix: ours stacked.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    blocks = list(model.trf_blocks)
    tied = model.out_head.weight is model.tok_emb.weight
    config = GPT2Config(vocab_size=model.tok_emb.weight.shape[0], n_positions=model.pos_emb.weight.shape[0],
                        n_embd=model.tok_emb.weight.shape[1], n_layer=len(blocks), n_head=blocks[0].att.num_heads,
                        activation_function="gelu_new", layer_norm_epsilon=blocks[0].norm1.eps,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied)
    state = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight,
             "transformer.ln_f.weight": model.final_norm.scale, "transformer.ln_f.bias": model.final_norm.shift,
             "lm_head.weight": model.out_head.weight}
    for i, block in enumerate(blocks):
        att, (expand, _, project) = block.att, block.ff.layers
        qkv = (att.W_query, att.W_key, att.W_value)
        prefix = f"transformer.h.{i}."
        state.update({
            prefix + "ln_1.weight": block.norm1.scale, prefix + "ln_1.bias": block.norm1.shift,
            prefix + "ln_2.weight": block.norm2.scale, prefix + "ln_2.bias": block.norm2.shift,
            prefix + "attn.c_attn.weight": torch.cat([lin.weight for lin in qkv]).T,
            prefix + "attn.c_attn.bias": torch.cat([
                lin.bias if lin.bias is not None else torch.zeros_like(lin.weight[:, 0]) for lin in qkv]),
            prefix + "attn.c_proj.weight": att.out_proj.weight.T, prefix + "attn.c_proj.bias": att.out_proj.bias,
            prefix + "mlp.c_fc.weight": expand.weight.T, prefix + "mlp.c_fc.bias": expand.bias,
            prefix + "mlp.c_proj.weight": project.weight.T, prefix + "mlp.c_proj.bias": project.bias,
        })
    hf_model = GPT2LMHeadModel(config)
    hf_model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = set(hf_model.state_dict()) - set(state)
    if missing - {f"transformer.h.{i}.attn.bias" for i in range(len(blocks))}:
        raise RuntimeError(f"transformers expects weights this converter does not fill: {sorted(missing)}")
    return hf_model.eval()


def weight_bytes_per_token(model: GPTModel) -> int:
    """Bytes of weights one decoding step reads: every parameter once, except the
    embedding tables, of which only one row each is read (a tied head counts once)."""
    unique = {id(p): p for p in model.parameters()}
    skip = {id(model.pos_emb.weight)}
    if model.out_head.weight is not model.tok_emb.weight:
        skip.add(id(model.tok_emb.weight))
    return sum(p.numel() * p.element_size() for key, p in unique.items() if key not in skip)


def measure_read_bandwidth(n_bytes: int, seconds: float) -> float:
    """Bytes per second at which torch reads a buffer larger than any CPU cache, summing
    it again and again for at least `seconds`.

    Summing is about the simplest read there is, so this is the speed limit that
    matters for decoding, which reads every weight once per token. It is measured over
    as long as a generation run takes: on a shared machine, a short measurement would
    often run undisturbed while a longer run would not, which makes the ceiling too high.
    """
    buffer = torch.ones(n_bytes // 4)
    buffer.sum()  # touch every page once before timing
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        buffer.sum()
        count += 1
    return n_bytes * count / (time.perf_counter() - start)


def profile_steps(model: GPTModelKV, prompt_ids: list[int], steps: int = 20) -> None:
    """Print where plain PyTorch one-token steps spend their time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    weights = inference_weights(model)
    cache = model.new_cache(capacity=len(prompt_ids) + steps + 1)
    with torch.inference_mode():
        forward_cached(weights, torch.tensor([prompt_ids]), cache, last_only=True)

        def step():
            decode_rows(weights, torch.tensor([11]), torch.tensor([cache.length]), cache, use_compile=False)
            cache.length += 1

        step()  # warm-up
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        wall = (time.perf_counter() - start) / steps
    averages = prof.key_averages()
    n_ops = sum(e.count for e in averages) / steps
    print(f"{steps} plain one-token steps (profiled: {wall * 1e3:.1f} ms per step, {n_ops:.0f} profiled op "
          "calls per step)")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
    products = sum(e.self_cpu_time_total for e in averages if e.key in ("aten::mm", "aten::addmm")) / 1e6 / steps
    total = sum(e.self_cpu_time_total for e in averages) / 1e6 / steps
    per_token = weight_bytes_per_token(model)
    bandwidth = measure_read_bandwidth(min(1 << 30, max(1 << 28, 2 * per_token)), 1.0)
    print(f"matrix products (aten::mm/addmm): {products * 1e3:.1f} ms of {total * 1e3:.1f} ms per step "
          f"({products / total:.0%}), reading the weights at {per_token / products / 1e9:.1f} GB/s; "
          f"summing a buffer reads {bandwidth / 1e9:.1f} GB/s")


def best_seconds(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def time_step_parts(model: GPTModelKV, int8: bool, bandwidth: float, repeats: int) -> None:
    """Print how fast the compiled step's output head and its blocks read their weights."""
    from gpt_kv_cache import _STEP

    weights = inference_weights(model, int8=int8)
    cache = model.new_cache(capacity=64)
    forward_cached(weights, torch.tensor([[1, 2, 3, 4]]), cache)
    for _ in range(3):  # compiles
        decode_rows(weights, torch.tensor([5]), torch.tensor([cache.length]), cache)
        cache.length += 1
    block_fn, head_fn = _STEP.get(compile_enabled())
    x, position = torch.randn(1, weights.tok_emb.shape[1]), torch.tensor([cache.length])

    def blocks():
        for i, block in enumerate(weights.blocks):
            block_fn(x, block, cache.keys[i], cache.values[i], position, cache.length, weights.n_heads, weights.eps)

    parts = {"output head": (lambda: head_fn(x, weights.final_norm, weights.head, weights.eps),
                             [weights.head.weight]),
             "transformer blocks": (blocks, [lin.weight for b in weights.blocks
                                             for lin in (b.query, b.key, b.value, b.out_proj, b.expand, b.project)])}
    for name, (run, tensors) in parts.items():
        seconds = best_seconds(run, repeats)
        n_bytes = sum(t.numel() * t.element_size() for t in tensors)
        print(f"{'int8' if int8 else 'float32':<8} {name:<19} {n_bytes / seconds / 1e9:5.1f} GB/s "
              f"({n_bytes / seconds / bandwidth:4.0%} of the sum; "
              f"{sum(t.numel() for t in tensors) / seconds / 1e9:.1f} billion weights/s)")


def breakdown(model: GPTModelKV, repeats: int = 10) -> None:
    """Read speed of the compiled step's parts, float32 and int8, against a sum's."""
    per_token = weight_bytes_per_token(model)
    bandwidth = measure_read_bandwidth(min(1 << 30, max(1 << 28, 2 * per_token)), 1.0)
    print(f"summing a buffer: {bandwidth / 1e9:.1f} GB/s")
    for int8 in (False, True):
        time_step_parts(model, int8, bandwidth, repeats)


def make_methods(model: GPTModelKV, args: argparse.Namespace, prompt_ids: list[int], cfg: dict) -> dict:
    """name -> function(n) that generates n tokens greedily and returns them."""
    threads = torch.get_num_threads()  # the count the ceiling is measured with
    methods = {BASELINE: lambda k: list(generate_stream(model, prompt_ids, k, threads=threads))}
    if not args.no_int8:
        methods["ours, KV cache, int8"] = \
            lambda k: list(generate_stream(model, prompt_ids, k, int8=True, threads=threads))
    if not args.no_plain:
        methods["ours, KV cache, plain"] = \
            lambda k: list(generate_stream(model, prompt_ids, k, use_compile=False, threads=threads))
    idx = torch.tensor([prompt_ids])
    if not args.no_transformers:
        hf_model = to_transformers(model)

        def hf_generate(k: int) -> list[int]:
            with torch.inference_mode():
                out = hf_model.generate(idx, max_new_tokens=k, min_new_tokens=k, do_sample=False, use_cache=True,
                                        attention_mask=torch.ones_like(idx), pad_token_id=0)
            return out[0, idx.shape[1]:].tolist()

        methods["transformers generate"] = hf_generate
    if args.uncached:
        methods["chapter's generate, no cache"] = \
            lambda k: generate(model, idx, k, cfg["context_length"])[0, idx.shape[1]:].tolist()
    return methods


def run_rounds(methods: dict, n: int, repeats: int, buffer_bytes: int) -> tuple[dict, dict, float, dict]:
    """Best seconds per method, its tokens, the best bandwidth, and first-call seconds."""
    # A short first call takes one-time costs (compiling, allocations, lazy
    # initialization) out of the timing; it is reported separately. Then the methods
    # take turns, round after round, and the bandwidth is measured in every round too:
    # on a shared machine the load changes over time, and taking turns exposes every
    # method to the same conditions.
    first = {}
    for name, generate_n in methods.items():
        start = time.perf_counter()
        generate_n(4)
        first[name] = time.perf_counter() - start
    best, results, bandwidth = dict.fromkeys(methods, float("inf")), {}, 0.0
    for _ in range(repeats):
        seconds = best[BASELINE] if best[BASELINE] < float("inf") else 1.0  # as long as our generation takes
        bandwidth = max(bandwidth, measure_read_bandwidth(buffer_bytes, seconds))
        for name, generate_n in methods.items():
            start = time.perf_counter()
            results[name] = generate_n(n)
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results, bandwidth, first


def report(best: dict, results: dict, bandwidth: float, first: dict, per_token: int, n: int) -> None:
    ceiling = bandwidth / per_token
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s; float32 weights read per token: "
          f"{per_token / 1e9:.3f} GB -> ceiling {ceiling:.1f} tokens/s")
    for name, seconds in best.items():
        rate = n / seconds
        print(f"{name:<30} {rate:8.1f} tokens/s  ({rate / ceiling:6.1%} of the ceiling, "
              f"{best[BASELINE] / seconds:5.2f}x ours; first call {first[name]:.1f} s)")
    reference = results[BASELINE]
    for name, tokens in results.items():
        if name != BASELINE:
            same = sum(a == b for a, b in zip(tokens, reference, strict=True))
            differ = [i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b]
            verdict = "all the same" if not differ else f"first difference at new token {differ[0]}"
            print(f"tokens of {name!r} vs ours: {same}/{len(reference)} equal, {verdict}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = BENCHMARK_CONFIGS[args.model]
    prompt_ids = get_tokenizer().encode(args.prompt)
    if problem := check_args(args, cfg, len(prompt_ids)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or decode_threads())
    model = build_model(cfg, args.seed)
    if args.profile:
        profile_steps(model, prompt_ids)
        return 0
    if args.breakdown:
        breakdown(model)
        return 0
    per_token = weight_bytes_per_token(model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, fp32, untied head), greedy, "
          f"{args.new_tokens} new tokens, best of {args.repeats} rounds")
    methods = make_methods(model, args, prompt_ids, cfg)
    buffer_bytes = min(1 << 30, max(1 << 28, 2 * per_token))
    best, results, bandwidth, first = run_rounds(methods, args.new_tokens, args.repeats, buffer_bytes)
    report(best, results, bandwidth, first, per_token, args.new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
