"""How close is int8 decoding to float32? Top-1 agreement and log-likelihood on the-verdict.

    python int8_quality.py --checkpoint ../01_main-chapter-code/output/checkpoint.pth
    python int8_quality.py --gpt2 124M            # OpenAI's GPT-2 (downloaded into ./gpt2 once)
    python int8_quality.py                        # random 124M-shape weights: a smoke test only

The model reads the-verdict in windows of its context length, once with its float32
weights and once with the int8 weights of `gpt_kv_cache` (`int8=True`: per-output-channel
scales). Printed: how often both put the same token first (top-1 agreement), the mean
log-likelihood per token of the text under each and their difference, and how many
tokens of a greedy continuation of --prompt agree before the first difference.
"""

import argparse
import sys
from pathlib import Path

import torch
from ch05_utils import read_text_file, the_verdict_path
from gpt_kv_cache import GPTModelKV, forward_cached, generate_stream, inference_weights
from previous_chapters import get_tokenizer
from ui_chat_core import load_model_file
from ui_generation_benchmark import BENCHMARK_CONFIGS, build_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, help="A gpt_train.py checkpoint or the book's model.pth.")
    source.add_argument("--gpt2", choices=["124M", "355M", "774M", "1558M"], help="OpenAI's GPT-2 of this size.")
    parser.add_argument("--models-dir", type=Path, default=Path("gpt2"), help="Where GPT-2's files are kept.")
    parser.add_argument("--prompt", default="Every effort moves you", help="Prompt of the greedy continuation.")
    parser.add_argument("--new-tokens", type=int, default=50, help="Length of the greedy continuation.")
    return parser


def load(args: argparse.Namespace) -> tuple[GPTModelKV, str]:
    if args.checkpoint is not None:
        return load_model_file(args.checkpoint), str(args.checkpoint)
    if args.gpt2 is not None:
        from gpt_download import config_from_hparams, download_and_load_gpt2, load_weights_into_gpt

        settings, params = download_and_load_gpt2(args.gpt2, args.models_dir)
        model = GPTModelKV(config_from_hparams(settings))
        load_weights_into_gpt(model, params)
        return model.eval(), f"OpenAI GPT-2 {args.gpt2}"
    return build_model(BENCHMARK_CONFIGS["124M"], 123), "random 124M-shape weights (no meaning: a smoke test)"


@torch.inference_mode()
def compare_on_text(model: GPTModelKV, token_ids: list[int]) -> dict:
    """Top-1 agreement and mean log-likelihood per token, float32 vs int8, over windows of the text."""
    ctx = model.context_length
    windows = [token_ids[i:i + ctx + 1] for i in range(0, len(token_ids) - 1, ctx)]
    windows = [w for w in windows if len(w) > 1]
    agree = total = 0
    loglik = {"float32": 0.0, "int8": 0.0}
    for window in windows:
        inputs, targets = torch.tensor([window[:-1]]), torch.tensor(window[1:])
        logits = {}
        for kind in loglik:
            weights = inference_weights(model, int8=kind == "int8")
            logits[kind] = forward_cached(weights, inputs, model.new_cache(capacity=len(window) - 1))[0]
            loglik[kind] += torch.log_softmax(logits[kind], -1).gather(-1, targets[:, None]).sum().item()
        agree += (logits["float32"].argmax(-1) == logits["int8"].argmax(-1)).sum().item()
        total += len(targets)
    return {"tokens": total, "agreement": agree / total,
            "loglik_fp32": loglik["float32"] / total, "loglik_int8": loglik["int8"] / total}


def greedy_agreement(model: GPTModelKV, prompt_ids: list[int], n: int) -> tuple[int, int]:
    """Tokens of the two greedy continuations that agree before the first difference, and n."""
    fp32 = list(generate_stream(model, prompt_ids, n, use_compile=False))
    int8 = list(generate_stream(model, prompt_ids, n, int8=True, use_compile=False))
    same = next((i for i, (a, b) in enumerate(zip(fp32, int8, strict=False)) if a != b), min(len(fp32), len(int8)))
    return same, len(fp32)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.new_tokens < 1:
        print("error: --new-tokens must be at least 1.", file=sys.stderr)
        return 2
    tokenizer = get_tokenizer()
    try:
        model, name = load(args)
        text_ids = tokenizer.encode(read_text_file(the_verdict_path()))
        inference_weights(model, int8=True)  # a model int8 cannot quantize is refused here
    except (ValueError, FileNotFoundError, OSError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = compare_on_text(model, text_ids)
    same, n = greedy_agreement(model, tokenizer.encode(args.prompt), args.new_tokens)
    print(f"model: {name}; the-verdict: {result['tokens']} predicted tokens in windows of {model.context_length}")
    print(f"top-1 agreement float32 vs int8: {result['agreement']:.2%}")
    print(f"mean log-likelihood per token: float32 {result['loglik_fp32']:.4f}, int8 {result['loglik_int8']:.4f}, "
          f"difference {result['loglik_int8'] - result['loglik_fp32']:+.4f} nats")
    print(f"greedy continuation of {args.prompt!r}: {same} of {n} tokens equal before the first difference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
