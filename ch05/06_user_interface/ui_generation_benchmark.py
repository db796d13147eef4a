"""How fast does the chat app generate? Tokens per second, greedy, one sequence.

    python ui_generation_benchmark.py                    # 124M shape, 200 new tokens
    python ui_generation_benchmark.py --model tiny --new-tokens 20 --repeats 1

Compares, with the same random weights in the same process:
  1. our model with the KV cache (`gpt_kv_cache.generate_stream`, what the apps use),
  2. our model without it (the chapter's `generate`, a full forward pass per token),
  3. Hugging Face `transformers`' `GPT2LMHeadModel.generate` (its own KV cache).

Decoding one sequence is bound by memory bandwidth: every new token reads every weight
once. The script measures how fast this machine reads memory and prints each result as
a fraction of the resulting ceiling, tokens/s <= bandwidth / bytes of weights.
"""

import argparse
import sys
import time

import torch
from ch05_utils import generate
from gpt_kv_cache import GPTModelKV, generate_stream
from previous_chapters import GPT_CONFIG_124M, GPTModel, get_tokenizer

BENCHMARK_CONFIGS = {
    # OpenAI's GPT-2 small: the shape app_orig.py runs (1024 positions, biased q/k/v).
    "124M": {**GPT_CONFIG_124M, "context_length": 1024, "qkv_bias": True, "drop_rate": 0.0},
    "tiny": {**GPT_CONFIG_124M, "context_length": 256, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
             "qkv_bias": True, "drop_rate": 0.0},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(BENCHMARK_CONFIGS), default="124M", help="Model shape.")
    parser.add_argument("--new-tokens", type=int, default=200, help="Tokens to generate per run.")
    parser.add_argument("--prompt", default="Every effort moves you", help="Prompt to continue.")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Rounds in which every method runs once (the best time of each counts).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--skip-uncached", action="store_true", help="Skip the slow run without a KV cache.")
    parser.add_argument("--skip-transformers", action="store_true", help="Skip the transformers comparison.")
    parser.add_argument("--seed", type=int, default=123, help="Seed of the random weights.")
    return parser


def build_model(cfg: dict, seed: int) -> GPTModelKV:
    """Random weights, output head tied to the token embedding as in OpenAI's GPT-2."""
    torch.manual_seed(seed)
    model = GPTModelKV(cfg)
    model.out_head.weight = model.tok_emb.weight
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


def measure_read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second at which torch reads a buffer larger than any CPU cache (best of `repeats`).

    Summing is about the simplest read there is; the matrix-vector products of decoding
    read their weights about as fast, so this is the speed limit that matters.
    """
    buffer = torch.ones(n_bytes // 4)
    buffer.sum()  # touch every page once before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return n_bytes / best


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.new_tokens < 1 or args.repeats < 1:
        print("error: --new-tokens and --repeats must be at least 1.", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = BENCHMARK_CONFIGS[args.model]
    prompt_ids = get_tokenizer().encode(args.prompt)
    if not prompt_ids or len(prompt_ids) + args.new_tokens > cfg["context_length"]:
        print(f"error: the prompt ({len(prompt_ids)} tokens) plus --new-tokens must fit the context length "
              f"{cfg['context_length']} and the prompt must not be empty.", file=sys.stderr)
        return 2
    n = args.new_tokens
    model = build_model(cfg, args.seed)
    idx = torch.tensor([prompt_ids])

    per_token = weight_bytes_per_token(model)
    buffer_bytes = min(1 << 30, max(1 << 28, 2 * per_token))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, fp32), greedy, "
          f"{n} new tokens, best of {args.repeats} rounds")

    methods = {"ours, KV cache": lambda k: list(generate_stream(model, prompt_ids, k))}
    if not args.skip_uncached:
        methods["ours, no cache"] = lambda k: generate(model, idx, k, cfg["context_length"])[0, idx.shape[1]:].tolist()
    if not args.skip_transformers:
        hf_model = to_transformers(model)

        def hf_generate(k: int) -> list[int]:
            with torch.inference_mode():
                out = hf_model.generate(idx, max_new_tokens=k, min_new_tokens=k, do_sample=False, use_cache=True,
                                        attention_mask=torch.ones_like(idx), pad_token_id=0)
            return out[0, idx.shape[1]:].tolist()

        methods["transformers generate"] = hf_generate

    # A short warm-up call takes one-time costs (allocations, lazy initialization) out
    # of the timing. Then the methods take turns, round after round, and the bandwidth
    # is measured in every round too: on a shared machine the load changes over time,
    # and taking turns exposes every method to the same conditions.
    for generate_n in methods.values():
        generate_n(4)
    best = dict.fromkeys(methods, float("inf"))
    bandwidth, results = 0.0, {}
    for _ in range(args.repeats):
        bandwidth = max(bandwidth, measure_read_bandwidth(buffer_bytes))
        for name, generate_n in methods.items():
            start = time.perf_counter()
            results[name] = generate_n(n)
            best[name] = min(best[name], time.perf_counter() - start)
    ceiling = bandwidth / per_token
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s; weights read per token: {per_token / 1e9:.3f} GB "
          f"-> ceiling {ceiling:.1f} tokens/s")
    for name, seconds in best.items():
        rate = n / seconds
        print(f"{name:<22} {rate:8.1f} tokens/s  ({rate / ceiling:6.1%} of the ceiling)")
    reference = results["ours, KV cache"]
    for name, tokens in results.items():
        if name != "ours, KV cache":
            differ = [i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b]
            verdict = "all the same" if not differ else f"first difference at new token {differ[0]}"
            print(f"tokens of {name!r} vs the KV cache: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
