"""``qcore quantize``: the command line over :func:`qcore.convert.quantize_checkpoint` (arguments, summary, signals).

    qcore quantize model.safetensors model-int8.safetensors
    qcore quantize llama/ llama-w4/ --bits 4 --group-size 128 --exclude "layers.0.*"
    qcore quantize llama/ llama-ct/ --bits 4 --asymmetric --group-size 128 --format compressed-tensors
    qcore quantize llama/ llama-q4_1.gguf --bits 4 --asymmetric --format gguf
    python -m qcore quantize ...

What is quantized, how the output is written and what a model folder's ``config.json`` gets are described in
:mod:`qcore.convert`; this module only turns arguments into a call and the result into a summary.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Optional, Sequence

from .convert import (DEFAULT_EXCLUDE, RequestError, _say, _silence, fmt_bytes, positive_int, quantize_checkpoint,
                      select_tensors)
from .formats import DEFAULT_FORMAT, output_format_names
from .model_folder import copy_side_files
from .patterns import NamePattern

__all__ = ["main", "build_parser", "Pattern", "select_tensors", "quantize_checkpoint", "fmt_bytes",
           "package_version", "CliError", "DEFAULT_EXCLUDE", "copy_side_files"]

#: A user-facing error: printed as one line, exit status 1 (no traceback).
CliError = RequestError


def package_version() -> str:
    """The installed distribution's version, or the package's own ``__version__`` when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("qcore-qtorch")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


Pattern = NamePattern  # tensor-name patterns: see qcore.patterns


def _print_summary(s: dict, out=None) -> None:
    out = out if out is not None else sys.stdout

    def print(line, file=None):  # noqa: A001 - every line of the summary survives a closed pipe
        _say(line, out)
    ratio = s["input_bytes"] / s["output_bytes"] if s["output_bytes"] else float("nan")
    gibs = s["input_bytes"] / 2**30 / s["seconds"] if s["seconds"] > 0 else float("inf")
    shards = f" ({s['shards']} shards)" if s["kind"] == "sharded" else ""
    print(f"qcore quantize: {s['quantized']} tensors quantized ({s['scheme']}), {s['copied']} copied unchanged",
          file=out)
    print(f"  input   {fmt_bytes(s['input_bytes']):>10}  {s['input']}{shards}", file=out)
    print(f"  output  {fmt_bytes(s['output_bytes']):>10}  {s['output']}", file=out)
    print(f"  ratio   {ratio:.2f}x smaller, {s['seconds']:.1f} s ({gibs:.2f} GiB/s)", file=out)
    if s["worst_sqnr"]:
        print(f"  worst SQNR ({len(s['worst_sqnr'])} of {s['quantized']} quantized tensors):", file=out)
        for db, name, shape in s["worst_sqnr"]:
            level = "exact" if db == float("inf") else f"{db:7.2f} dB"  # no error: the codes hold the values
            print(f"    {level:>10}  {name}  {list(shape)}", file=out)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def _bits(text: str) -> int:
    v = positive_int(text)
    if not 1 <= v <= 8:
        raise argparse.ArgumentTypeError(f"bits must be in 1..8, got {v}")
    return v


_SELECTION_HELP = f"""\
which tensors are quantized:
  by default, every 2-D floating tensor (F16, BF16, F32, F64) whose name ends in ".weight", except names
  matching the default exclusions {', '.join(DEFAULT_EXCLUDE)}
  (embeddings, lm_head, norms). Biases, norms, 1-D and integer tensors are copied unchanged.
  --include replaces that default: only 2-D floating tensors matching an --include pattern are quantized.
  --exclude removes tensors from whichever selection applies.

patterns:
  an exact dotted name ("lm_head"), an fnmatch glob ("*.mlp.*", "*" also matches dots) or "re:<regex>"
  (Python syntax, full match). A pattern matches whole dotted names, and a module name covers the tensors
  below it: "layers.1" matches "layers.1.q_proj.weight" but not "layers.10.q_proj.weight".
  A list of patterns runs to the next option: put INPUT OUTPUT first, or end the list with "--".

scheme:
  symmetric signed codes by default (--asymmetric: unsigned codes with a zero point), one scale per output
  channel (row), or per group of N consecutive inputs along each row with --group-size N.

output:
  written under a temporary name beside OUTPUT and renamed when complete; an existing OUTPUT is refused
  unless --overwrite, and is replaced only after the new output is complete. If a run was killed while
  replacing OUTPUT, the next run on it first puts back the previous OUTPUT or finishes the new one, and
  removes what killed runs left. OUTPUT may not be inside a folder INPUT. Torch is not needed.
  With --format qcore, a folder OUTPUT's config.json gets a "quantization_config" marker (no "quant_method"):
  transformers then refuses the folder instead of loading random weights; load it with qtorch.from_pretrained.

formats (--format):
  qcore               qcore's own tensors (W.qweight, W.scale, W.zero_point); any scheme qcore has.
  compressed-tensors  the "pack-quantized" format of the compressed-tensors package: config.json gets its
                      quantization_config, so transformers (with compressed-tensors installed), vLLM and
                      qtorch.from_pretrained load the folder. Weights of modules (names ending in .weight),
                      one scale per row or groups along the row; a tensor it cannot store is named, and
                      nothing is written.
  gguf                one llama.cpp GGUF file (OUTPUT ends in .gguf) of a Llama-architecture model folder
                      (config.json, byte-level BPE tokenizer.json, safetensors weights): --bits 8 is Q8_0,
                      --bits 4 Q4_0, --bits 4 --asymmetric Q4_1, in GGUF's blocks of 32 along each row (no other
                      --group-size), quantized with llama.cpp's rounding and float16 scales; Q and K rows in
                      llama.cpp's order; the other tensors as floats. Streamed one tensor at a time, written
                      under a temporary name and renamed when complete; the gguf package is needed.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcore", description="qcore: NumPy-first weight quantization.")
    parser.add_argument("--version", action="version", version=f"qcore {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    q = sub.add_parser(
        "quantize", help="quantize a safetensors checkpoint (file or sharded folder)",
        description="Quantize a safetensors checkpoint tensor by tensor, in bounded memory, without torch.",
        epilog=_SELECTION_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    # nargs="?": their absence is reported by main(), which can say why (an --include/--exclude list before
    # them takes every word up to the next option, INPUT and OUTPUT included)
    q.add_argument("input", metavar="INPUT", nargs="?",
                   help="a .safetensors file, or a folder with model.safetensors.index.json or model.safetensors")
    q.add_argument("output", metavar="OUTPUT", nargs="?",
                   help="output .safetensors file (file INPUT) or folder (folder INPUT; shards mirror INPUT)")
    q.add_argument("--bits", type=_bits, default=8, metavar="{1..8}", help="bits per weight (default: %(default)s)")
    q.add_argument("--asymmetric", action="store_true",
                   help="unsigned codes with a zero point (default: symmetric signed codes; 1 bit needs this)")
    q.add_argument("--group-size", type=positive_int, default=None, metavar="N",
                   help="one scale per N consecutive inputs along each row (default: one scale per row)")
    q.add_argument("--include", action="extend", nargs="+", default=[], metavar="PATTERN",
                   help="quantize only tensors matching these patterns (default: *.weight minus the exclusions "
                        "below)")
    q.add_argument("--exclude", action="extend", nargs="+", default=[], metavar="PATTERN",
                   help=f"never quantize tensors matching these patterns (always excluded by default: "
                        f"{' '.join(DEFAULT_EXCLUDE)}, unless --include is given)")
    q.add_argument("--format", choices=output_format_names(), default=DEFAULT_FORMAT,
                   help="what is written: qcore's own checkpoint (default; loads with qtorch.from_pretrained), "
                        "compressed-tensors' pack-quantized (loads with transformers and vLLM too), or one GGUF "
                        "file for llama.cpp (see below)")
    q.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    q.add_argument("--quiet", "-q", action="store_true",
                   help="print nothing but errors (no progress bar, warnings, notes or summary)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``qcore`` console script and ``python -m qcore``; returns the exit status.

    A reader that goes away (``qcore ... | head -1``) silences the output instead of raising: the work itself
    is not affected and the exit status is the command's own.
    """
    try:
        return _main(argv)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BrokenPipeError:
                _silence(stream)
            except (OSError, ValueError):
                pass


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "quantize":  # pragma: no cover - argparse only accepts known commands
        return 2
    if args.output is None:
        missing = "INPUT and OUTPUT are" if args.input is None else "OUTPUT is"
        lists = [f"--{name} {' '.join(getattr(args, name))}" for name in ("include", "exclude")
                 if getattr(args, name)]
        hint = (f"; {' and '.join(lists)}: a pattern list takes every word up to the next option, so put INPUT "
                f"OUTPUT before it or end the list with --" if lists else "")
        _say(f"qcore quantize: error: {missing} missing{hint}", sys.stderr)
        return 2
    previous = _raise_on_sigterm()
    try:
        if args.format == "gguf":
            from .formats.gguf_model import quantize_folder

            summary = quantize_folder(args.input, args.output, bits=args.bits, symmetric=not args.asymmetric,
                                      group_size=args.group_size, include=args.include, exclude=args.exclude,
                                      overwrite=args.overwrite)
        else:
            summary = quantize_checkpoint(args.input, args.output, bits=args.bits, symmetric=not args.asymmetric,
                                          group_size=args.group_size, include=args.include, exclude=args.exclude,
                                          overwrite=args.overwrite, quiet=args.quiet, format=args.format)
    except KeyboardInterrupt:
        _say("qcore quantize: interrupted; no output written", sys.stderr)
        return 130
    except _Terminated:
        _say("qcore quantize: terminated; no output written", sys.stderr)
        return 143
    except (CliError, ValueError, OSError, ImportError) as e:
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        _say(f"qcore quantize: error: {msg}", sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not args.quiet:
        _print_summary(summary)
    return 0


class _Terminated(BaseException):
    """SIGTERM turned into an exception, so that temporary files are removed on the way out."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _raise_on_sigterm():
    """Install the SIGTERM handler (main thread only); returns the previous handler or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)
