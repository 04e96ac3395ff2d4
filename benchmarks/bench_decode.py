"""Token-by-token decoding of a causal LM built from a config (no download): dense against w8a16 / w4a16.

    python benchmarks/bench_decode.py                  # Llama-style, hidden 2048, 4 layers; bfloat16 and float32
    python benchmarks/bench_decode.py --layers 2 --dtypes bfloat16 --tokens 16

The model is ``transformers.LlamaForCausalLM`` with random weights (decoding speed does not depend on their
values), quantized in place by ``qtorch.quantize_model`` (``lm_head`` stays dense, as by default). Each variant
greedily generates ``--tokens`` new tokens after a short prompt, with the KV cache, every Linear seeing one row per
step: the case weight-only quantization is for. Reported: the model's memory (``qtorch.memory_footprint``),
milliseconds per generated token (best of ``--repeats`` rounds in which the three models alternate; the prompt's
prefill cancelled out by timing two generations of different lengths) and the speed-up over the dense model of
the same dtype.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qtorch  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(hidden: int, layers: int, vocab: int, dtype: torch.dtype):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 64 * 64,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 128,
                                   num_key_value_heads=hidden // 128, vocab_size=vocab,
                                   max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _generate_seconds(model, prompt, n: int) -> float:
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t


def ms_per_token(models: dict, prompt, tokens: int, repeats: int) -> dict:
    """Best-of-N milliseconds per generated token of every model, measured in alternation (the machine is shared:
    all see the same conditions), the prefill cancelled out: (t(1 + tokens) - t(1)) / tokens."""
    best = {name: [float("inf"), float("inf")] for name in models}
    with torch.no_grad():
        for m in models.values():
            _generate_seconds(m, prompt, 2)  # warm-up: kernels compile or load from the cache
        for _ in range(repeats):
            for name, m in models.items():
                best[name][0] = min(best[name][0], _generate_seconds(m, prompt, 1))
                best[name][1] = min(best[name][1], _generate_seconds(m, prompt, 1 + tokens))
    return {name: (full - short) / tokens * 1e3 for name, (short, full) in best.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    prompt = torch.randint(0, args.vocab, (1, 16))
    print(f"LlamaForCausalLM hidden={args.hidden} layers={args.layers} vocab={args.vocab}, {args.tokens} new tokens "
          f"after a 16-token prompt, greedy, KV cache; torch {torch.__version__}, threads={torch.get_num_threads()}")
    print("| dtype | model | model memory | ms / token | speed-up |")
    print("|---|---|---|---|---|")
    for dname in args.dtypes:
        models = {"dense": build(args.hidden, args.layers, args.vocab, DTYPES[dname])}
        for scheme in ("w8a16", "w4a16"):
            models[scheme] = copy.deepcopy(models["dense"])
            qtorch.quantize_model(models[scheme], scheme)
        ms = ms_per_token(models, prompt, args.tokens, args.repeats)
        for name, m in models.items():
            mb = qtorch.memory_footprint(m) / 2**20
            print(f"| {dname} | {name} | {mb:.0f} MiB | {ms[name]:.1f} | {ms['dense'] / ms[name]:.2f}x |", flush=True)
        del models
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
