"""Token-by-token decoding of a causal LM built from a config (no download): dense against w8a16 / w4a16.

    python benchmarks/bench_decode.py                  # Llama-style, hidden 2048, 4 layers; bfloat16 and float32
    python benchmarks/bench_decode.py --layers 2 --dtypes bfloat16 --tokens 16
    python benchmarks/bench_decode.py --compile        # torch.compile on a static KV cache, qtorch.compile's layouts
    python benchmarks/bench_decode.py --dense-mv       # also dense with its one-row Linear calls by torch.mv

The model is ``transformers.LlamaForCausalLM`` with random weights (decoding speed does not depend on their
values), quantized in place by ``qtorch.quantize_model`` (``lm_head`` stays dense, as by default). Each variant
greedily generates ``--tokens`` new tokens after a short prompt, with the KV cache, every Linear seeing one row per
step: the case weight-only quantization is for. Reported per model:

* model memory (``qtorch.memory_footprint``) and the weight bytes one decoding step reads (every Linear's
  weight, quantized codes plus the scales the kernel reads; ``lm_head`` included);
* milliseconds per generated token: greedy decoding as ``generate`` does it (one forward call with the KV cache,
  argmax), the models advancing in lockstep, one timed step each in turn, so that all see the same moments of a
  shared machine (a contended 2-core host made whole ``generate`` calls vary 10x from one second to the next);
  the median over all ``--tokens`` steps of ``--repeats`` rounds, after an untimed warm-up round (``--whole``: one
  model at a time instead, each decoding its whole answer, the order reversed every other round: each step then
  finds in the caches what the model's own last step left, as in a process serving one model);
* speed-up over the dense model of the same dtype, and against the byte-ratio limit (dense bytes / quantized
  bytes read per step: what a purely memory-bound decoder would gain if the step did nothing but read weights),
  as a percentage of that limit;
* the same against the *step* limit, which keeps the work no weight format removes: a copy of the dense model whose
  Linear layers cost nothing (they return zeros; attention, norms, rotary embeddings, the KV cache and the Python of
  the step remain) decodes in the same lockstep, its ms/token is that fixed work ``F``, and a purely memory-bound
  quantized model takes ``F + (dense - F) * quantized bytes / dense bytes``;
* below the table, the forward path each quantized layer shape took (layout/kernel) for the one-row decoding
  steps and for the prompt.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import qtorch  # noqa: E402
from qtorch.siblings import inductor_options  # noqa: E402
from _layers import bytes_per_token, format_paths, prefetch_line, sibling_groups  # noqa: E402
from _machine import machine_line  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TABLE_HEAD = ("| dtype | model | model memory | weights read / token | ms / token | tokens / s | speed-up "
              "| byte-ratio limit | % of limit | step limit | % of step limit |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
#: how the table's heading names the --whole order
WHOLE = "one model at a time (each its whole answer, the order reversed every other round)"
#: the model with free Linear layers, decoded alongside (not a row of the table): the step's fixed work
FREE = "free-linear"


class FreeLinear(nn.Module):
    """A Linear that costs (almost) nothing: the input's first feature in every output column. Stands in for every
    Linear of a copy of the dense model, whose decoding time is then the step's work that no weight format removes.
    Not zeros: torch.compile folds the attention and norms of zeros away (SmolLM2 compiled: 1.9 ms of "fixed work"
    a step with zeros)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features = linear.out_features

    def forward(self, x):
        return x[..., :1].expand(*x.shape[:-1], self.out_features).contiguous()


#: the row of the dense model whose one-row Linear calls go to ``torch.mv`` (``--dense-mv``)
MV = "dense (torch.mv)"


class MvLinear(nn.Linear):
    """An ``nn.Linear`` whose one-row calls go to ``torch.mv`` (other calls as ``nn.Linear``): the dense model's
    own best one-row path where PyTorch's ``F.linear`` of one row is the slower of the two. On the AMX Xeon (torch
    2.13, bfloat16) ``F.linear`` of one row took 1.2-1.7x ``torch.mv``'s time on the same weight, with the same
    outputs; in float32 the two were within 10%."""

    def forward(self, x):
        if x.numel() == self.in_features and x.dim():
            y = torch.mv(self.weight, x.reshape(-1))
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        return super().forward(x)


def mv_linear_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every plain ``nn.Linear`` an :class:`MvLinear` (same weights, tied ones still
    tied)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if type(mod) is nn.Linear:
            mod.__class__ = MvLinear
    return m


def max_logit_diff(a: nn.Module, b: nn.Module, prompt: torch.Tensor) -> float:
    """Largest absolute difference of the two models' logits on ``prompt`` and its one-token continuation (a
    one-row call of every Linear)."""
    kw = _cache_keyword(a)
    with torch.no_grad():
        la = a(input_ids=prompt, use_cache=True)
        lb = b(input_ids=prompt, use_cache=True)
        nxt = la.logits[:, -1:].argmax(-1)
        da = a(input_ids=nxt, use_cache=True, **{kw: _cache_of(la)}).logits.float()
        db = b(input_ids=nxt, use_cache=True, **{kw: _cache_of(lb)}).logits.float()
    return float(max((la.logits.float() - lb.logits.float()).abs().max(), (da - db).abs().max()))


def _cache_keyword(model) -> str:
    # the cache keyword is ``cache`` from transformers 5.x on, ``past_key_values`` before
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return getattr(out, "cache", None) or out.past_key_values


def free_linear_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` replaced by :class:`FreeLinear` (their weights not copied)."""
    memo = {id(m): FreeLinear(m) for m in model.modules() if isinstance(m, nn.Linear)}
    return copy.deepcopy(model, memo)


def build(hidden: int, layers: int, vocab: int, dtype: torch.dtype):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 64 * 64,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 128,
                                   num_key_value_heads=hidden // 128, vocab_size=vocab,
                                   max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


@dataclasses.dataclass
class Decode:
    """One model's decoding: the median and best ms of its one-token steps, the median prefill ms and the greedy
    token ids it produced (prompt excluded, from the last round)."""

    ms_median: float
    ms_best: float
    prefill_ms: float
    tokens: torch.Tensor


def _greedy_steps(model, prompt: torch.Tensor, tokens: int):
    """Greedy decoding as ``generate`` does it, one forward call per ``next()``: first the prompt (prefill), then
    ``tokens`` one-token steps with the KV cache; each call's argmax becomes the next input. Returns the ids."""
    kw = _cache_keyword(model)
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # lm_head on the last position only
    out = model(input_ids=prompt, use_cache=True, **extra)
    cache = _cache_of(out)
    ids = [out.logits[:, -1].argmax(-1, keepdim=True)]
    yield
    for _ in range(tokens):
        out = model(input_ids=ids[-1], use_cache=True, **extra, **{kw: cache})
        ids.append(out.logits[:, -1].argmax(-1, keepdim=True))
        yield
    return torch.cat(ids, 1)[0]


def decode_step(model, prompt: torch.Tensor, max_steps: int = 256):
    """A callable that runs one greedy decoding step of ``model`` with its KV cache after ``prompt`` (batch 1): what
    ``qtorch.tune_layouts`` times. The prompt is run again, in the call after ``max_steps`` steps, to bound the
    cache."""
    state = {"gen": None, "left": 0}

    def step():
        if state["left"] == 0:
            state["gen"], state["left"] = _greedy_steps(model, prompt, max_steps), max_steps
            next(state["gen"])  # the prompt
        next(state["gen"])
        state["left"] -= 1

    return step


def tune(models: dict, prompt: torch.Tensor) -> None:
    """``qtorch.tune_layouts`` on every quantized model of ``models``, timing its decoding steps as the table does:
    each timed step comes right after one step of every other model (the lockstep's cache state, which decides
    between close layouts: SmolLM2's 8-bit layers ran faster ``blocked`` in lockstep and ``int8pack`` alone).
    Prints the picks."""
    steps = {name: decode_step(m, prompt) for name, m in models.items()}
    for name, m in models.items():
        if name in ("dense", MV, FREE):
            continue
        clock = [0.0]

        def run(name=name):
            for other, step in steps.items():
                if other != name:
                    step()
            t0 = time.perf_counter()
            steps[name]()
            clock[0] += time.perf_counter() - t0

        t = time.perf_counter()
        picks = qtorch.tune_layouts(m, run, timer=lambda: clock[0])
        print(f"{name}: layouts tuned on decoding steps in {time.perf_counter() - t:.1f} s: "
              + ", ".join(f"{k.split('|')[0]} {v}" for k, v in picks.items()), flush=True)


class CompiledSteps:
    """Greedy decoding like :func:`_greedy_steps` (call it with the same arguments), its one-token steps by
    ``torch.compile(model.forward)`` on a static KV cache (``transformers.StaticCache``: fixed shapes, so one graph
    serves every step), with qtorch's post-grad pass (:func:`qtorch.siblings.inductor_options`: the blocked layers
    that read one row take one call); the prompt runs eagerly. The graph compiles at the first step (a minute or more for a
    30-layer model on 2 cores): the decoding a deployment compiles once and reuses."""

    def __init__(self, model, max_len: int):
        import transformers

        self.model = model
        try:
            self.cache = transformers.StaticCache(config=model.config, max_cache_len=max_len)
        except TypeError as e:  # transformers 4.x took other arguments
            raise SystemExit(f"compiled decoding needs transformers 5's StaticCache(config=, max_cache_len=): {e}")
        self.step = torch.compile(model.forward, dynamic=False, options=inductor_options())

    def __call__(self, model, prompt: torch.Tensor, tokens: int):
        n = prompt.shape[1]
        self.cache.reset()
        out = self.model(input_ids=prompt, past_key_values=self.cache, cache_position=torch.arange(n),
                         use_cache=True, logits_to_keep=1)
        ids = [out.logits[:, -1].argmax(-1, keepdim=True)]
        yield
        for i in range(tokens):
            out = self.step(input_ids=ids[-1], past_key_values=self.cache, cache_position=torch.tensor([n + i]),
                            use_cache=True, logits_to_keep=1)
            ids.append(out.logits[:, -1].argmax(-1, keepdim=True))
            yield
        return torch.cat(ids, 1)[0]


def compiled_steppers(models: dict, prompt: torch.Tensor, tokens: int, log=print) -> dict:
    """``{name: CompiledSteps}`` for every model, each quantized one first put in the layouts ``qtorch.compile``
    would hold (its compiled probes' race, the layers that read one input, seen in a call of the prompt, weighed
    together), then a few eager steps (each layer's one-row path is measured, and the trace takes it)."""
    from qtorch.compile import choose_layouts
    from qtorch.sibling_layouts import find_siblings

    for name, m in models.items():
        if name not in ("dense", MV, FREE):
            picks = choose_layouts(m, options=inductor_options(), siblings=find_siblings(m, prompt))
            log(f"{name}: compiled layouts {picks}")
    with torch.no_grad():
        for m in models.values():
            for _ in _greedy_steps(m, prompt, 4):
                pass
    return {name: CompiledSteps(m, prompt.shape[1] + tokens + 1) for name, m in models.items()}


def decode_ms(models: dict, prompt: torch.Tensor, tokens: int, repeats: int, steppers: dict | None = None,
              whole: bool = False) -> dict:
    """``{name: Decode}`` for every model: greedy decoding of ``tokens`` steps after ``prompt`` (batch 1), the
    models advancing in lockstep, one timed step each in turn, so that all see the same moments of a shared
    machine; one untimed warm-up round (kernels compile, paths are measured), then ``repeats`` timed rounds. The
    per-step figure is the median over all steps of all rounds. ``steppers``: ``{name: decoder}`` used instead of
    :func:`_greedy_steps` for those models (e.g. :class:`CompiledSteps`). ``whole``: one model at a time instead,
    each decoding its whole answer before the next starts (the order reversed every other round): each step then
    finds in the caches what the model's own step before it left there, as when one model serves, where in
    lockstep the other models' steps evict it (on a CPU whose last-level cache holds a small model whole, that
    decides where its weights are read from)."""
    steps = {name: [] for name in models}
    prefill = {name: [] for name in models}
    ids = {}
    steppers = steppers or {}

    def timed(name, g, r, i):
        t = time.perf_counter()
        try:
            next(g)
        except StopIteration as stop:
            ids[name] = stop.value
            return
        dt = (time.perf_counter() - t) * 1e3
        if r:
            (prefill if i == 0 else steps)[name].append(dt)

    with torch.no_grad():
        for r in range(repeats + 1):
            order = list(models) if r % 2 == 0 or not whole else list(reversed(models))
            gens = {name: steppers.get(name, _greedy_steps)(models[name], prompt, tokens) for name in order}
            if whole:
                for name, g in gens.items():
                    for i in range(tokens + 2):
                        timed(name, g, r, i)
                continue
            for i in range(tokens + 2):  # prefill, the steps, then the generator's return
                for name, g in gens.items():
                    timed(name, g, r, i)
    return {name: Decode(statistics.median(steps[name]), min(steps[name]), statistics.median(prefill[name]),
                         ids[name]) for name in models}


def step_limit(dense_ms: float, fixed_ms: float, byte_ratio: float) -> float:
    """Speed-up of a purely memory-bound quantized model over the dense one when ``fixed_ms`` of the dense step
    is work no weight format removes and the rest scales with the bytes read.

    >>> round(step_limit(30.0, 6.0, 4.0), 2)  # 24 ms of weights read 4x faster: 6 + 6 ms
    2.5
    """
    return dense_ms / (fixed_ms + max(dense_ms - fixed_ms, 0.0) / byte_ratio)


def table_rows(label: str, models: dict, result: dict) -> list:
    """Markdown rows of the table in ``TABLE_HEAD`` for ``models`` (the first one the dense baseline; a
    :data:`FREE` entry, if any, is the fixed work and gets no row)."""
    names = [n for n in models if n != FREE]
    base = names[0]
    read = {name: bytes_per_token(models[name]) for name in names}
    fixed = result[FREE].ms_median if FREE in result else None
    rows = []
    for name in names:
        mem = qtorch.memory_footprint(models[name]) / 2**20
        speed = result[base].ms_median / result[name].ms_median
        limit = read[base] / read[name]
        against = "- | - | - | -" if name == base else f"{limit:.2f}x | {100 * speed / limit:.0f}%"
        if name != base:
            if fixed is None:
                against += " | - | -"
            else:
                step = step_limit(result[base].ms_median, fixed, limit)
                against += f" | {step:.2f}x | {100 * speed / step:.0f}%"
        rows.append(f"| {label} | {name} | {mem:.0f} MiB | {read[name] / 2**20:.1f} MiB | "
                    f"{result[name].ms_median:.1f} | {1e3 / result[name].ms_median:.1f} | {speed:.2f}x | {against} |")
    return rows


def path_lines(models: dict, dtype: torch.dtype, prompt_rows: int) -> list:
    """One line per quantized model: the path each layer shape (out x in) took at 1 row and at the prompt's rows."""
    lines = []
    for name, m in models.items():
        if any(isinstance(x, qtorch.QuantLinear) for x in m.modules()):
            lines.append(f"  {name}: decode (1 row): {format_paths(m, dtype, 1)}")
            lines.append(f"  {name}: prompt ({prompt_rows} rows): {format_paths(m, dtype, prompt_rows)}")
            lines.append(f"  {name}: sibling layers decoded as one launch (qtorch.sibling_calls): {sibling_groups(m)}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--tune", action="store_true",
                   help="qtorch.tune_layouts on each quantized model's decoding steps before timing")
    p.add_argument("--compile", action="store_true",
                   help="decode every model with torch.compile(model.forward) on a static KV cache, each quantized "
                        "layer shape in the layout qtorch.compile would choose; compiles each model once")
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
    prompt = torch.randint(0, args.vocab, (1, 16))
    print(machine_line())
    print(f"LlamaForCausalLM hidden={args.hidden} layers={args.layers} vocab={args.vocab}, {args.tokens} new tokens "
          f"after a {prompt.shape[1]}-token prompt, greedy, "
          f"{'compiled (static KV cache)' if args.compile else 'KV cache'}; ms / token = median step over "
          f"{args.repeats} rounds, {WHOLE if args.whole else 'models in lockstep'}")
    print(TABLE_HEAD)
    notes = []
    for dname in args.dtypes:
        dt = DTYPES[dname]
        models = {"dense": build(args.hidden, args.layers, args.vocab, dt)}
        if args.dense_mv:
            models[MV] = mv_linear_copy(models["dense"])
            notes.append(f"{dname}: {MV} against dense, largest logit difference "
                         f"{max_logit_diff(models['dense'], models[MV], prompt):.3g}")
        for scheme in ("w8a16", "w4a16"):
            models[scheme] = copy.deepcopy(models["dense"])
            qtorch.quantize_model(models[scheme], scheme)
        models[FREE] = free_linear_copy(models["dense"])
        if args.tune:
            tune(models, prompt)
        steppers = None
        if args.compile:
            steppers = compiled_steppers(models, prompt, args.tokens, log=notes.append)
        result = decode_ms(models, prompt, args.tokens, args.repeats, steppers, whole=args.whole)
        print("\n".join(table_rows(dname, models, result)), flush=True)
        notes.append(f"{dname}: fixed work of a step (every Linear free) {result[FREE].ms_median:.1f} ms; "
                     f"prefill ({prompt.shape[1]} tokens), median ms: "
                     + ", ".join(f"{name} {r.prefill_ms:.1f}" for name, r in result.items() if name != FREE))
        notes += path_lines(models, dt, prompt.shape[1])
        del models
    print()
    print("prefill, and the path (layout/kernel) per layer shape out x in:")
    print("\n".join(notes + [line for line in [prefetch_line()] if line]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
