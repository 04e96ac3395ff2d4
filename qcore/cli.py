"""``qcore quantize``: quantize a safetensors checkpoint tensor by tensor, in bounded memory, without torch.

    qcore quantize model.safetensors model-int8.safetensors
    qcore quantize llama/ llama-w4/ --bits 4 --group-size 128 --exclude "layers.0.*"
    python -m qcore quantize ...

INPUT is a ``.safetensors`` file, or a folder with ``model.safetensors.index.json`` (shards) or
``model.safetensors``; OUTPUT mirrors it (same shard names, a new index, and the folder's small text files such
as ``config.json``, tokenizer files and sentence-transformers module folders copied). Each tensor is read with positioned reads in pieces of a few
million elements, quantized, and written into its place in the output file, so the peak memory depends on the
piece size, not on the checkpoint (measured in ``benchmarks/bench_checkpoint.py``). The input is read with
positioned reads rather than through a memory map because the pages of a map count towards the process's RSS
until it is closed: for a 1.1 GiB file read through ``safe_open`` the RSS reached 1.1 GiB, with ``pread`` 0.19 GiB.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Optional, Sequence

import numpy as np

from . import checkpoint as ck
from .patterns import NamePattern
from .quantize import dequantize, quantize
from .scheme import PerChannel, PerGroup, QuantScheme

__all__ = ["main", "build_parser", "Pattern", "select_tensors", "quantize_checkpoint", "fmt_bytes",
           "package_version"]

#: Names (or module names above them) never quantized unless --include asks: embeddings, output head, norms.
DEFAULT_EXCLUDE = ("*embed*", "*Embed*", "*lm_head", "*norm*", "*Norm*", "*wte", "*wpe")
#: Elements per piece read, quantized and written at a time (the working set is a few times this in bytes).
CHUNK_ELEMENTS = 1 << 21
_COPY_SUFFIXES = (".json", ".txt", ".model", ".md", ".jinja")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1 (no traceback)."""


def _silence(stream) -> None:
    """Point a stream whose reader went away (``qcore ... | head -1``) at /dev/null, so that neither the next
    write nor the flush at exit raises BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture): nothing to redirect
        pass


def _say(line: str, stream=None) -> None:
    """Print one line; a closed pipe silences the stream instead of raising."""
    stream = stream if stream is not None else sys.stdout
    try:
        print(line, file=stream, flush=True)
    except BrokenPipeError:
        _silence(stream)


def _stderr_log(line: str) -> None:
    _say(f"qcore quantize: {line}", sys.stderr)


def package_version() -> str:
    """The installed distribution's version, or the package's own ``__version__`` when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("qcore-qtorch")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


Pattern = NamePattern  # tensor-name patterns: see qcore.patterns


def _selected(name: str, info: ck.TensorInfo, include, exclude) -> bool:
    if info.dtype not in ck.FLOAT_CODES or len(info.shape) != 2:
        return False
    if include:
        chosen = any(p.matches(name) for p in include)
    else:
        chosen = name.endswith(".weight") and not any(p.matches(name) for p in _DEFAULT_PATTERNS)
    return chosen and not any(p.matches(name) for p in exclude)


_DEFAULT_PATTERNS = tuple(Pattern(t) for t in DEFAULT_EXCLUDE)


def select_tensors(infos: dict, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list:
    """Names of the tensors ``qcore quantize`` quantizes, from ``{name: TensorInfo}`` (see ``--help``)."""
    inc = [Pattern(t) for t in include]
    exc = [Pattern(t) for t in exclude]
    return [n for n, info in infos.items() if _selected(n, info, inc, exc)]


def fmt_bytes(n: float) -> str:
    """A size in binary units, as the project writes sizes everywhere: ``fmt_bytes(3 * 2**20) == '3.00 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0
    return f"{n} B"


# ---------------------------------------------------------------------------------------------------------
# Input, plan, output
# ---------------------------------------------------------------------------------------------------------

def _read_inputs(input_path: str):
    """``(kind, [(shard path, Header)], index shards or None)`` with every header and the index checked."""
    try:
        kind, files, shards = ck.checkpoint_files(input_path)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    if kind == "file" and not os.path.isfile(input_path):
        raise CliError(f"{input_path}: not a file or folder")
    headers = []
    seen: dict = {}
    for fpath in files:
        header = ck.read_header(fpath)
        if shards is not None:
            ck._check_shard_index(header, shards[os.path.basename(fpath)], os.path.join(input_path, ck.INDEX_NAME))
        if ck._parse_qmeta(header):
            raise CliError(f"{fpath}: already a qcore-quantized checkpoint; quantize the original instead")
        for name in header.tensors:
            if name in seen:
                raise CliError(f"{fpath}: tensor {name!r} is also in {seen[name]}")
            seen[name] = fpath
        headers.append((fpath, header))
    return kind, headers, shards


def _plan(headers, scheme: QuantScheme, include, exclude, log=None):
    """Per shard: ``[(TensorInfo, scheme or None)]`` in file order; checks the scheme fits every chosen tensor."""
    log = log or _stderr_log
    inc = [Pattern(t) for t in include]
    exc = [Pattern(t) for t in exclude]
    all_names = {n for _, h in headers for n in h.tensors}
    for p in inc + exc:
        if not any(p.matches(n) for n in all_names):
            log(f"warning: pattern {p.text!r} matches no tensor")
    plans, problems = [], []
    for _, header in headers:
        plan = []
        for name, info in header.tensors.items():
            chosen = _selected(name, info, inc, exc)
            if chosen:
                try:
                    scheme.validate_shape(info.shape)
                except ValueError as e:
                    problems.append(f"{name} {list(info.shape)}: {e}")
                    plan.append((info, None))
                    continue
                clash = [f"{name}.{s}" for s in ("qweight", "scale", "zero_point") if f"{name}.{s}" in all_names]
                if clash:
                    problems.append(f"{name}: the output name {clash[0]!r} is already a tensor of the input")
                _check_output_bound(header.path, info, scheme)
            plan.append((info, scheme if chosen else None))
        plans.append(plan)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CliError(f"{scheme} cannot be applied to: " + "; ".join(problems[:5]) + more
                       + ". Exclude these tensors with --exclude or pick another --group-size")
    return plans


def _check_output_bound(path: str, info: ck.TensorInfo, scheme: QuantScheme) -> None:
    """Refuse a tensor whose quantized form would be larger than 3 bytes per input byte, before anything is written.

    For a tensor with elements the bound always holds (at worst one 1-byte code, a 4-byte scale and a 1-byte
    zero point per 2-byte input element); it fails for a tensor without elements whose parameters would not
    be empty, such as ``[2**40, 0]`` per channel: 4 TiB of scales planned from a 96-byte file.
    """
    planned = sum(math.prod(shape) * ck.DTYPES[code].itemsize
                  for _, code, shape in ck.quantized_entries(info.name, info.shape, scheme))
    if planned > 3 * info.nbytes:
        what = (f"has no elements (shape {list(info.shape)}), yet" if info.nbytes == 0
                else f"holds {fmt_bytes(info.nbytes)}, yet")
        raise ValueError(f"{path}: tensor {info.name!r} {what} its {scheme} form would take {fmt_bytes(planned)}; "
                         f"refusing to write it (leave it out with --exclude {info.name})")


def _output_entries(plan) -> list:
    entries = []
    for info, scheme in plan:
        if scheme is None:
            entries.append((info.name, info.dtype, info.shape))
        else:
            entries.extend(ck.quantized_entries(info.name, info.shape, scheme))
    return entries


def _check_output(input_path: str, output: str, kind: str, overwrite: bool, log=None) -> str:
    out = os.path.abspath(output)
    src = os.path.abspath(input_path)
    if kind == "file":
        if not out.endswith(".safetensors"):
            raise CliError(f"OUTPUT {output!r} must end in .safetensors (INPUT is a single file)")
        if os.path.isdir(out):
            raise CliError(f"OUTPUT {output!r} is a folder; INPUT is a single file, so OUTPUT must be a file path")
    else:
        if out.endswith(".safetensors") and not os.path.isdir(out):
            raise CliError(f"OUTPUT {output!r} looks like a file name, but INPUT {input_path!r} is a folder, so "
                           f"OUTPUT must be a folder (it gets the same shard names); e.g. "
                           f"{output[:-len('.safetensors')] or 'out'}/")
        if os.path.lexists(out) and not os.path.isdir(out):
            raise CliError(f"OUTPUT {output!r} is a file; INPUT is a folder, so OUTPUT must be a folder")
    real_out, real_src = os.path.realpath(out), os.path.realpath(src)
    if real_out == real_src:
        raise CliError(f"OUTPUT {output!r} is the same as INPUT; write to a new path")
    if kind != "file" and real_src.startswith(real_out + os.sep):
        raise CliError(f"OUTPUT {output!r} contains INPUT; write to a new path")
    if kind != "file" and real_out.startswith(real_src + os.sep):
        # a later run on INPUT would copy this output's index, whose shards are not beside it
        raise CliError(f"OUTPUT {output!r} is inside INPUT {input_path!r}; write it outside the model folder")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        what = "is not a folder" if os.path.exists(parent) else "does not exist"
        raise CliError(f"cannot write OUTPUT {output!r}: its parent {parent!r} {what}")
    # a run killed while replacing OUTPUT may have left it moved aside: put it back before deciding anything
    for note in ck.recover_output(out):
        (log or _stderr_log)(f"note: {note.replace(out, repr(output))}")
    if os.path.lexists(out) and not overwrite:
        raise CliError(f"OUTPUT {output!r} already exists; pass --overwrite to replace it")
    return out


def _read_into(f, offset: int, arr: np.ndarray, name: str) -> None:
    mv = memoryview(arr.reshape(-1).view(np.uint8))
    pos = 0
    while pos < len(mv):
        n = os.preadv(f.fileno(), [mv[pos:]], offset + pos) if hasattr(os, "preadv") else None
        if n is None:
            f.seek(offset + pos)
            n = f.readinto(mv[pos:])
        if not n:
            raise CliError(f"tensor {name!r}: unexpected end of file (was the input changed while reading?)")
        pos += n


class _Stats:
    def __init__(self):
        self.sqnr: list = []  # (dB, name, shape)
        self.quantized = 0
        self.copied = 0


def _stream_tensor(f, info: ck.TensorInfo, scheme: Optional[QuantScheme], writer, stats: _Stats, bar) -> None:
    dt = info.np_dtype
    if scheme is None:  # a plain tensor: bytes copied unchanged, file to file, in pieces (for the progress bar)
        step = CHUNK_ELEMENTS * 4
        for b0 in range(0, info.nbytes, step):
            k = min(step, info.nbytes - b0)
            writer.copy_from(info.name, f.fileno(), info.start + b0, k)
            bar.update(k)
        stats.copied += 1
        return
    rows, cols = info.shape
    names = [e[0] for e in ck.quantized_entries(info.name, info.shape, scheme)]
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    signal = noise = 0.0
    # No elements: every output entry is empty too (_check_output_bound), so there is nothing to loop over;
    # looping over rows of nothing would take 2**40 / step rounds for a [2**40, 0] tensor.
    for r0 in range(0, rows if info.nbytes else 0, step):
        x = np.empty((min(step, rows - r0), cols), dt)
        _read_into(f, info.start + r0 * cols * dt.itemsize, x, info.name)
        # float16/bfloat16 widen exactly to float32, where quantize computes anyway: convert once.
        xf = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
        del x
        try:
            qa = quantize(xf, scheme)  # rows quantize independently (per-channel axis 0 / groups along rows)
        except ValueError as e:
            bad = np.argwhere(~np.isfinite(xf))
            if len(bad):
                i, j = int(bad[0][0]), int(bad[0][1])
                raise CliError(f"tensor {info.name!r}: {xf[i, j]} at index ({i + r0}, {j}); NaN and Inf cannot "
                               "be quantized (leave the tensor out with --exclude)") from None
            raise ValueError(f"tensor {info.name!r}: {e}") from None
        writer.write(names[0], ck.encode_qweight(qa))
        writer.write(names[1], qa.scale)
        if qa.zero_point is not None:
            writer.write(names[2], qa.zero_point)
        if xf.size:
            # sqnr_db of qcore.metrics, accumulated over pieces: 10 log10(sum x^2 / sum (x - x_hat)^2).
            # Row dot products in the compute dtype, summed in float64: 7x faster than metrics.mse here,
            # and equal to metrics.sqnr_db on the whole tensor to ~1e-4 dB (tested).
            d = dequantize(qa, dtype=xf.dtype)
            np.subtract(xf, d, out=d)
            noise += float(np.einsum("ij,ij->i", d, d).sum(dtype=np.float64))
            signal += float(np.einsum("ij,ij->i", xf, xf).sum(dtype=np.float64))
            del d
        bar.update(xf.size * dt.itemsize)
    db = math.inf if noise == 0 else (-math.inf if signal == 0 else 10.0 * math.log10(signal / noise))
    stats.sqnr.append((db, info.name, info.shape))
    stats.quantized += 1


class _NoBar:
    def update(self, n):
        pass

    def set_description_str(self, s):
        pass

    def close(self):
        pass


def _progress(total: int, quiet: bool = False):
    if quiet or not sys.stderr.isatty():
        return _NoBar()
    return _BinaryBar(total)


class _BinaryBar:
    """tqdm counting bytes, shown in MiB (binary units, as every size qcore prints)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self._bar = tqdm(total=total / 2**20, unit="MiB", bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                         "{n:.1f}/{total:.1f} MiB [{elapsed}<{remaining}, {rate_fmt}]", file=sys.stderr,
                         dynamic_ncols=True)

    def _guarded(self, fn, *args):
        # a terminal that went away must not stop the work: the bar goes quiet instead
        try:
            fn(*args)
        except BrokenPipeError:
            _silence(sys.stderr)
            self._bar.disable = True

    def update(self, n):
        self._guarded(self._bar.update, n / 2**20)

    def set_description_str(self, s):
        self._guarded(self._bar.set_description_str, s)

    def close(self):
        self._guarded(self._bar.close)


def _write_index(path: str, weight_map: dict, total_size: int) -> None:
    import json

    body = json.dumps({"metadata": {"total_size": total_size, ck.META_VERSION: str(ck.FORMAT_VERSION)},
                       "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".index.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~ck._umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def copy_side_files(src_root: str, dst_root: str, out: str) -> None:
    """Copy the small text files of a model folder (config, tokenizer, sentence-transformers module folders
    such as ``1_Pooling/``) beside the new shards. Links, hidden entries, OUTPUT itself, tensors and pickles
    are skipped."""
    skip = {os.path.realpath(out), os.path.realpath(dst_root)}
    for dirpath, dirnames, filenames in os.walk(src_root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not os.path.islink(os.path.join(dirpath, d))
                             and os.path.realpath(os.path.join(dirpath, d)) not in skip)
        rel = os.path.relpath(dirpath, src_root)
        for fname in sorted(filenames):
            src = os.path.join(dirpath, fname)
            if (fname.startswith(".") or not fname.endswith(_COPY_SUFFIXES) or os.path.islink(src)
                    or (rel == "." and fname == ck.INDEX_NAME)):
                continue
            dst_dir = os.path.normpath(os.path.join(dst_root, rel))
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copyfile(src, os.path.join(dst_dir, fname))


def quantize_checkpoint(input_path, output, *, bits: int = 8, symmetric: bool = True,
                        group_size: Optional[int] = None, include: Sequence[str] = (),
                        exclude: Sequence[str] = (), overwrite: bool = False, quiet: bool = False,
                        log=None) -> dict:
    """Quantize the checkpoint ``input_path`` into ``output`` (see the module docstring); returns a summary dict.

    Raises ``ValueError`` for a bad input file, ``CliError`` for a bad request (existing output, scheme that
    does not fit a tensor, ...) and ``OSError`` for I/O failures; in every case nothing is left at ``output``
    (an existing ``output`` is untouched) and no temporary file remains. Warnings and notes go to ``log`` (a
    callable taking one line; default: standard error), or nowhere with ``quiet``.
    """
    log = (lambda line: None) if quiet else (log or _stderr_log)
    input_path = os.fspath(input_path)
    try:
        gran = PerGroup(group_size) if group_size else PerChannel(0)
        scheme = QuantScheme(bits=bits, symmetric=symmetric, granularity=gran)
        for text in list(include) + list(exclude):
            Pattern(text)  # a bad regex is reported before any work
    except (ValueError, TypeError) as e:
        raise CliError(str(e)) from None
    t0 = time.perf_counter()
    kind, headers, _ = _read_inputs(input_path)
    plans = _plan(headers, scheme, include, exclude, log)
    out = _check_output(input_path, os.fspath(output), kind, overwrite, log)
    in_bytes = sum(h.file_size for _, h in headers)
    total = sum(info.nbytes for plan in plans for info, _ in plan)
    stats = _Stats()
    bar = _progress(total, quiet)
    tmpdir = None
    out_files = []
    try:
        if kind == "file":
            targets = [out]
        else:
            tmpdir = ck.staging_folder(out)
            targets = [os.path.join(tmpdir, os.path.basename(fpath)) for fpath, _ in headers]
        weight_map, total_size = {}, 0
        for (fpath, header), plan, target in zip(headers, plans, targets):
            qtable = {info.name: {"scheme": s.to_dict(), "shape": list(info.shape),
                                  "dtype": info.np_dtype.name} for info, s in plan if s is not None}
            entries = _output_entries(plan)
            md = ck.qcore_metadata(qtable, {k: v for k, v in header.metadata.items() if not k.startswith("qcore.")})
            bar.set_description_str(os.path.basename(fpath))
            with ck.SafetensorsWriter(target, entries, md, overwrite=overwrite or kind != "file") as w, \
                    os.fdopen(ck._open_regular(fpath), "rb", buffering=0) as f:
                if header.identity and ck._identity(os.fstat(f.fileno())) != header.identity:
                    raise ValueError(f"{fpath}: the file changed after its header was read; run again")
                for info, s in plan:
                    _stream_tensor(f, info, s, w, stats, bar)
            out_files.append(target)
            for name, code, shape in entries:
                weight_map[name] = os.path.basename(target)
                total_size += math.prod(shape) * ck.DTYPES[code].itemsize
        if kind != "file":
            if kind == "sharded":
                _write_index(os.path.join(tmpdir, ck.INDEX_NAME), weight_map, total_size)
            copy_side_files(input_path, tmpdir, out)
        out_bytes = sum(os.path.getsize(p) for p in out_files)
        if tmpdir is not None:
            ck.commit_folder(tmpdir, out)
            tmpdir = None
    finally:
        bar.close()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    seconds = time.perf_counter() - t0
    return {"input": input_path, "output": out, "kind": kind, "shards": len(headers), "scheme": scheme,
            "input_bytes": in_bytes, "output_bytes": out_bytes, "seconds": seconds,
            "quantized": stats.quantized, "copied": stats.copied,
            "worst_sqnr": sorted(stats.sqnr, key=lambda t: t[0])[:5]}


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
            print(f"    {db:7.2f} dB  {name}  {list(shape)}", file=out)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _bits(text: str) -> int:
    v = _positive_int(text)
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
    q.add_argument("--group-size", type=_positive_int, default=None, metavar="N",
                   help="one scale per N consecutive inputs along each row (default: one scale per row)")
    q.add_argument("--include", action="extend", nargs="+", default=[], metavar="PATTERN",
                   help="quantize only tensors matching these patterns (default: *.weight minus the exclusions "
                        "below)")
    q.add_argument("--exclude", action="extend", nargs="+", default=[], metavar="PATTERN",
                   help=f"never quantize tensors matching these patterns (always excluded by default: "
                        f"{' '.join(DEFAULT_EXCLUDE)}, unless --include is given)")
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
        summary = quantize_checkpoint(args.input, args.output, bits=args.bits, symmetric=not args.asymmetric,
                                      group_size=args.group_size, include=args.include, exclude=args.exclude,
                                      overwrite=args.overwrite, quiet=args.quiet)
    except KeyboardInterrupt:
        _say("qcore quantize: interrupted; no output written", sys.stderr)
        return 130
    except _Terminated:
        _say("qcore quantize: terminated; no output written", sys.stderr)
        return 143
    except (CliError, ValueError, OSError) as e:
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
