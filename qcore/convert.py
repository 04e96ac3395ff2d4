"""Quantize a safetensors checkpoint tensor by tensor, in bounded memory, without torch (``qcore quantize``).

>>> import numpy as np, os, tempfile, qcore
>>> d = tempfile.mkdtemp()
>>> qcore.checkpoint.save(os.path.join(d, "m.safetensors"), {"fc.weight": np.ones((4, 64), np.float32)})
>>> s = quantize_checkpoint(os.path.join(d, "m.safetensors"), os.path.join(d, "q.safetensors"), bits=4, quiet=True)
>>> s["quantized"], str(s["scheme"])
(1, 'sym int4 per-channel(axis=0)')

INPUT is a ``.safetensors`` file, or a folder with ``model.safetensors.index.json`` (shards) or
``model.safetensors``; OUTPUT mirrors it (same shard names, a new index, and the folder's small text files such
as ``config.json``, tokenizer files and sentence-transformers module folders copied, :mod:`qcore.model_folder`).
A folder's ``config.json`` gets the format's ``quantization_config``: for ``"qcore"`` (the default) the marker of
:func:`qcore.model_folder.quantization_marker`, so that transformers refuses the folder instead of loading random
weights; for ``"compressed-tensors"`` that format's own, which transformers and vLLM load
(:mod:`qcore.formats.compressed_tensors`). How each quantized tensor is named, encoded and described is the
business of the checkpoint format (:mod:`qcore.formats`).
Each tensor is read with positioned reads in pieces of a few million elements, quantized, and written into its
place in the output file, so the peak memory depends on the piece size, not on the checkpoint (measured in
``benchmarks/bench_checkpoint.py``). The input is read with positioned reads rather than through a memory map
because the pages of a map count towards the process's RSS until it is closed: for a 1.1 GiB file read through
``safe_open`` the RSS reached 1.1 GiB, with ``pread`` 0.19 GiB.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from . import checkpoint as ck
from . import model_folder
from .formats import DEFAULT_FORMAT, get_format
from .labels import format_bytes
from .patterns import NamePattern
from .quantize import dequantize, quantize
from .scheme import PerChannel, PerGroup, QuantScheme

__all__ = ["quantize_checkpoint", "select_tensors", "fmt_bytes", "RequestError", "DEFAULT_EXCLUDE", "CHUNK_ELEMENTS"]

#: Names (or module names above them) never quantized unless an include list asks: embeddings, output head, norms.
DEFAULT_EXCLUDE = ("*embed*", "*Embed*", "*lm_head", "*norm*", "*Norm*", "*wte", "*wpe")
#: Elements per piece read, quantized and written at a time (the working set is a few times this in bytes).
CHUNK_ELEMENTS = 1 << 21


class RequestError(ValueError):
    """A request that cannot be carried out as asked (existing output, a scheme that does not fit a tensor, ...):
    reported to the user as one line, without a traceback."""


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


def _selected(name: str, info: ck.TensorInfo, include, exclude) -> bool:
    if info.dtype not in ck.FLOAT_CODES or len(info.shape) != 2:
        return False
    if include:
        chosen = any(p.matches(name) for p in include)
    else:
        chosen = name.endswith(".weight") and not any(p.matches(name) for p in _DEFAULT_PATTERNS)
    return chosen and not any(p.matches(name) for p in exclude)


_DEFAULT_PATTERNS = tuple(NamePattern(t) for t in DEFAULT_EXCLUDE)


def select_tensors(infos: dict, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list:
    """Names of the tensors ``qcore quantize`` quantizes, from ``{name: TensorInfo}`` (see ``--help``)."""
    inc = [NamePattern(t) for t in include]
    exc = [NamePattern(t) for t in exclude]
    return [n for n, info in infos.items() if _selected(n, info, inc, exc)]


def positive_int(text: str) -> int:
    """The argument type of both command lines for counts and sizes (``--group-size``, ``--rounds``)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def fmt_bytes(n: float) -> str:
    """A size in binary units: ``fmt_bytes(3 * 2**20) == '3.00 MiB'`` (:func:`qcore.labels.format_bytes`)."""
    return format_bytes(n)


# ---------------------------------------------------------------------------------------------------------
# Input, plan, output
# ---------------------------------------------------------------------------------------------------------

def _read_inputs(input_path: str):
    """``(kind, [(shard path, Header)], index shards or None)`` with every header and the index checked."""
    try:
        kind, files, shards = ck.checkpoint_files(input_path)
    except FileNotFoundError as e:
        raise RequestError(str(e)) from None
    if kind == "file" and not os.path.isfile(input_path):
        raise RequestError(f"{input_path}: not a file or folder")
    headers = []
    seen: dict = {}
    for fpath in files:
        header = ck.read_header(fpath)
        if shards is not None:
            ck._check_shard_index(header, shards[os.path.basename(fpath)], os.path.join(input_path, ck.INDEX_NAME))
        if ck._parse_qmeta(header):
            fmt = ck._format_of(header).name
            raise RequestError(f"{fpath}: already a quantized checkpoint ({fmt} format); quantize the original "
                               f"instead")
        for name in header.tensors:
            if name in seen:
                raise RequestError(f"{fpath}: tensor {name!r} is also in {seen[name]}")
            seen[name] = fpath
        headers.append((fpath, header))
    return kind, headers, shards


def _plan(headers, scheme: QuantScheme, include, exclude, fmt, log=None):
    """Per shard: ``[(TensorInfo, scheme or None)]`` in file order; checks the scheme fits every chosen tensor."""
    log = log or _stderr_log
    inc = [NamePattern(t) for t in include]
    exc = [NamePattern(t) for t in exclude]
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
                problem = fmt.check(name, tuple(info.shape), scheme)
                if problem:
                    problems.append(f"{name} {list(info.shape)}: {problem}")
                    plan.append((info, None))
                    continue
                clash = [t for t in fmt.candidates(name) if t in all_names]
                if clash:
                    problems.append(f"{name}: the output name {clash[0]!r} is already a tensor of the input")
                _check_output_bound(header.path, info, scheme, fmt)
            plan.append((info, scheme if chosen else None))
        plans.append(plan)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise RequestError(f"{scheme} cannot be applied to: " + "; ".join(problems[:5]) + more
                           + ". Exclude these tensors with --exclude or pick another --group-size"
                           + ("" if fmt.name == DEFAULT_FORMAT else f" (format {fmt.name}); nothing was written"))
    return plans


def _check_output_bound(path: str, info: ck.TensorInfo, scheme: QuantScheme, fmt) -> None:
    """Refuse a tensor whose quantized form would be larger than 3 bytes per input byte, before anything is written.

    For a tensor with elements the bound always holds (at worst one 1-byte code, a 4-byte scale and a 1-byte
    zero point per 2-byte input element); it fails for a tensor without elements whose parameters would not
    be empty, such as ``[2**40, 0]`` per channel: 4 TiB of scales planned from a 96-byte file.
    """
    planned = sum(math.prod(shape) * ck.DTYPES[code].itemsize
                  for _, code, shape in fmt.entries(info.name, info.shape, scheme))
    if planned > 3 * info.nbytes:
        what = (f"has no elements (shape {list(info.shape)}), yet" if info.nbytes == 0
                else f"holds {fmt_bytes(info.nbytes)}, yet")
        raise ValueError(f"{path}: tensor {info.name!r} {what} its {scheme} form would take {fmt_bytes(planned)}; "
                         f"refusing to write it (leave it out with --exclude {info.name})")


def _output_entries(plan, fmt) -> list:
    entries = []
    for info, scheme in plan:
        if scheme is None:
            entries.append((info.name, info.dtype, info.shape))
        else:
            entries.extend(fmt.entries(info.name, info.shape, scheme))
    return entries


def _check_output(input_path: str, output: str, kind: str, overwrite: bool, log=None) -> str:
    out = os.path.abspath(output)
    src = os.path.abspath(input_path)
    if kind == "file":
        if not out.endswith(".safetensors"):
            raise RequestError(f"OUTPUT {output!r} must end in .safetensors (INPUT is a single file)")
        if os.path.isdir(out):
            raise RequestError(f"OUTPUT {output!r} is a folder; INPUT is a single file, so OUTPUT must be a file path")
    else:
        if out.endswith(".safetensors") and not os.path.isdir(out):
            raise RequestError(f"OUTPUT {output!r} looks like a file name, but INPUT {input_path!r} is a folder, so "
                           f"OUTPUT must be a folder (it gets the same shard names); e.g. "
                           f"{output[:-len('.safetensors')] or 'out'}/")
        if os.path.lexists(out) and not os.path.isdir(out):
            raise RequestError(f"OUTPUT {output!r} is a file; INPUT is a folder, so OUTPUT must be a folder")
    if os.path.realpath(out) == os.path.realpath(src):
        raise RequestError(f"OUTPUT {output!r} is the same as INPUT; write to a new path")
    problem = None if kind == "file" else model_folder.placement_problem(input_path, output)
    if problem:
        raise RequestError(problem)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        what = "is not a folder" if os.path.exists(parent) else "does not exist"
        raise RequestError(f"cannot write OUTPUT {output!r}: its parent {parent!r} {what}")
    # a run killed while replacing OUTPUT may have left it moved aside: put it back before deciding anything
    for note in ck.recover_output(out):
        (log or _stderr_log)(f"note: {note.replace(out, repr(output))}")
    if os.path.lexists(out) and not overwrite:
        raise RequestError(f"OUTPUT {output!r} already exists; pass --overwrite to replace it")
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
            raise RequestError(f"tensor {name!r}: unexpected end of file (was the input changed while reading?)")
        pos += n


class _Stats:
    def __init__(self):
        self.sqnr: list = []  # (dB, name, shape)
        self.quantized = 0
        self.copied = 0


def _stream_tensor(f, info: ck.TensorInfo, scheme: Optional[QuantScheme], writer, stats: _Stats, bar,
                   fmt=None) -> None:
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
    fmt = fmt or get_format()
    multiple = fmt.row_multiple(scheme)  # e.g. rows whose zero points fill whole int32 words
    step = max(multiple, CHUNK_ELEMENTS // max(cols, 1) // multiple * multiple)
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
                raise RequestError(f"tensor {info.name!r}: {xf[i, j]} at index ({i + r0}, {j}); NaN and Inf cannot "
                               "be quantized (leave the tensor out with --exclude)") from None
            raise ValueError(f"tensor {info.name!r}: {e}") from None
        for tname, part in fmt.encode_rows(info.name, qa, info.shape, r0).items():  # the next rows of each entry
            writer.write(tname, part)
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
    if math.prod(info.shape):  # an empty tensor has no error to rank
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


def _write_index(path: str, weight_map: dict, total_size: int, fmt) -> None:
    import json

    body = json.dumps({"metadata": {"total_size": total_size, **fmt.index_metadata()},
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


def _version() -> str:
    from . import __version__

    return __version__


def quantize_checkpoint(input_path, output, *, bits: int = 8, symmetric: bool = True,
                        group_size: Optional[int] = None, include: Sequence[str] = (),
                        exclude: Sequence[str] = (), overwrite: bool = False, quiet: bool = False,
                        log=None, format: str = DEFAULT_FORMAT) -> dict:
    """Quantize the checkpoint ``input_path`` into ``output`` (see the module docstring); returns a summary dict.

    ``bits``, ``symmetric`` and ``group_size`` (None: one scale per row) make the scheme; ``include`` /
    ``exclude`` are :class:`~qcore.patterns.NamePattern` texts (default selection: every 2-D floating
    ``*.weight`` tensor not matching :data:`DEFAULT_EXCLUDE`); ``format`` names the checkpoint format written.

    Raises ``ValueError`` for a bad input file, ``RequestError`` for a bad request (existing output, scheme that
    does not fit a tensor, ...) and ``OSError`` for I/O failures; in every case nothing is left at ``output``
    (an existing ``output`` is untouched) and no temporary file remains. Warnings and notes go to ``log`` (a
    callable taking one line; default: standard error), or nowhere with ``quiet``.
    """
    log = (lambda line: None) if quiet else (log or _stderr_log)
    input_path = os.fspath(input_path)
    # one pattern given as a str is that pattern (as quantize_model takes it), never its letters one by one
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude
    try:
        fmt = get_format(format)
        gran = PerGroup(group_size) if group_size else PerChannel(0)
        scheme = QuantScheme(bits=bits, symmetric=symmetric, granularity=gran)
        for text in list(include) + list(exclude):
            NamePattern(text)  # a bad regex is reported before any work
    except (ValueError, TypeError) as e:
        raise RequestError(str(e)) from None
    t0 = time.perf_counter()
    kind, headers, _ = _read_inputs(input_path)
    plans = _plan(headers, scheme, include, exclude, fmt, log)
    marked = kind != "file" and any(s is not None for plan in plans for _, s in plan)
    if marked:
        model_folder.check_config(input_path)  # a config.json that cannot carry the marker: refused before any work
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
            qtable = {info.name: fmt.describe(s, info.shape, info.np_dtype) for info, s in plan if s is not None}
            entries = _output_entries(plan, fmt)
            md = fmt.file_metadata(qtable, {k: v for k, v in header.metadata.items() if not fmt.owns_key(k)})
            bar.set_description_str(os.path.basename(fpath))
            with ck.SafetensorsWriter(target, entries, md, overwrite=overwrite or kind != "file") as w, \
                    os.fdopen(ck._open_regular(fpath), "rb", buffering=0) as f:
                if header.identity and ck._identity(os.fstat(f.fileno())) != header.identity:
                    raise ValueError(f"{fpath}: the file changed after its header was read; run again")
                for info, s in plan:
                    _stream_tensor(f, info, s, w, stats, bar, fmt)
            out_files.append(target)
            for name, code, shape in entries:
                weight_map[name] = os.path.basename(target)
                total_size += math.prod(shape) * ck.DTYPES[code].itemsize
        if kind != "file":
            if kind == "sharded":
                _write_index(os.path.join(tmpdir, ck.INDEX_NAME), weight_map, total_size, fmt)
            model_folder.copy_side_files(input_path, tmpdir, out)
            if marked:
                quantized = {info.name: s for plan in plans for info, s in plan if s is not None}
                # 2-D float weights left dense: the folder's format may have to name them (compressed-tensors'
                # ignore list)
                dense = [info.name for plan in plans for info, s in plan
                         if s is None and info.name.endswith(".weight") and len(info.shape) == 2
                         and info.dtype in ck.FLOAT_CODES]
                model_folder.mark_config(tmpdir, fmt.folder_config("qcore", _version(), quantized, dense))
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
