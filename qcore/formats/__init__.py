"""Checkpoint formats: how one quantized tensor is named, encoded and described inside a safetensors file.

A format is a small registered :class:`CheckpointFormat`. :mod:`qcore.checkpoint` and
:func:`qcore.convert.quantize_checkpoint` handle the container (headers, streaming writes, atomic commits,
shards) and ask the format for everything else: the entries that store a quantized tensor, the arrays that go
into them, the ``__metadata__`` that describes them, and how to read them back. The formats are ``"qcore"``
(:mod:`qcore.formats.native`, the default) and ``"compressed-tensors"`` (:mod:`qcore.formats.compressed_tensors`,
the ``pack-quantized`` format that transformers and vLLM load); a new one is one module plus one
:func:`register_format` call.

>>> fmt = get_format("qcore")
>>> import qcore
>>> [e[0] for e in fmt.entries("w", (4, 32), qcore.QuantScheme(4, False, qcore.PerGroup(16)))]
['w.qweight', 'w.scale', 'w.zero_point']
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence


from ..quantize import QuantizedArray
from ..scheme import QuantScheme

__all__ = ["CheckpointFormat", "register_format", "get_format", "format_names", "format_of", "DEFAULT_FORMAT",
           "FILE_FORMATS", "output_format_names"]

DEFAULT_FORMAT = "qcore"


class CheckpointFormat:
    """One way of storing quantized tensors in a safetensors file. Subclass, set the class attributes, implement
    the methods, and :func:`register_format` an instance.

    Rows must stay rows: :meth:`encode` of the next rows of a tensor (quantized on their own) gives the next
    rows of each entry, so that ``quantize_checkpoint`` can stream a tensor piece by piece.
    """

    #: Name used by ``get_format`` (and written into model-folder markers).
    name: str = ""
    #: Version of the format's own metadata.
    version: int = 1
    #: Prefix of the ``__metadata__`` keys this format owns; a file holding one of them is in this format.
    metadata_prefix: str = ""

    def entries(self, name: str, shape: tuple, scheme: QuantScheme) -> list:
        """``[(tensor name, safetensors dtype code, shape), ...]`` that store the quantized tensor ``name``."""
        raise NotImplementedError

    def candidates(self, name: str) -> tuple:
        """Every tensor name this format could use for ``name`` under any scheme (for unexpected-entry checks)."""
        raise NotImplementedError

    def encode(self, name: str, qa: QuantizedArray) -> dict:
        """``{tensor name: array}`` for ``qa``, with the names, dtypes and shapes of :meth:`entries`."""
        raise NotImplementedError

    def decode(self, path: str, name: str, scheme: QuantScheme, shape: tuple, arrays: Mapping) -> QuantizedArray:
        """The :class:`QuantizedArray` stored in ``arrays`` (``{tensor name: array}`` of :meth:`entries`),
        its values checked; a ``ValueError`` naming ``path``, the tensor and the field otherwise."""
        raise NotImplementedError

    def describe(self, scheme: QuantScheme, shape: tuple, dtype=None) -> dict:
        """The JSON-able description of one quantized tensor that :meth:`file_metadata` stores."""
        raise NotImplementedError

    def file_metadata(self, described: Mapping[str, dict], extra: Optional[Mapping[str, str]] = None) -> dict:
        """The ``__metadata__`` of a file holding the quantized tensors ``{name: describe(...)}``, plus ``extra``."""
        raise NotImplementedError

    def read_table(self, header) -> dict:
        """``{name: (scheme, shape, dtype name or None)}`` from a checked header's metadata (``{}`` if none)."""
        raise NotImplementedError

    def index_metadata(self) -> dict:
        """String entries for the ``metadata`` of a sharded checkpoint's index."""
        return {}

    def check(self, name: str, shape: tuple, scheme: QuantScheme) -> Optional[str]:
        """Why this format cannot store ``name`` of ``shape`` under ``scheme`` (one line), or None when it can.
        Asked before anything is written, so that a refusal names every such tensor at once."""
        return None

    def row_multiple(self, scheme: QuantScheme) -> int:
        """Pieces of rows handed to :meth:`encode_rows` hold a multiple of this many rows (but the last)."""
        return 1

    def encode_rows(self, name: str, qa: QuantizedArray, shape: tuple, row0: int) -> dict:
        """The next parts of each entry for rows ``row0:row0 + len(qa)`` of the tensor ``name`` of ``shape``
        (:func:`qcore.convert.quantize_checkpoint` streams pieces of rows); default :meth:`encode`."""
        return self.encode(name, qa)

    def folder_config(self, producer: str, version: str, quantized: Mapping[str, QuantScheme],
                      dense: Sequence[str] = ()) -> dict:
        """The ``quantization_config`` of a model folder's ``config.json`` holding ``quantized`` (``{tensor name:
        scheme}``) beside the dense 2-D weights ``dense``; default: qcore's marker (:mod:`qcore.model_folder`)."""
        from ..model_folder import quantization_marker

        schemes = []
        for s in quantized.values():
            if s.to_dict() not in schemes:
                schemes.append(s.to_dict())
        return quantization_marker(producer, version, schemes, self.name)

    def owns_key(self, key: str) -> bool:
        """Whether a ``__metadata__`` key belongs to this format (an input's such keys are not carried over)."""
        return bool(self.metadata_prefix) and key.startswith(self.metadata_prefix)

    def __repr__(self) -> str:
        return f"<checkpoint format {self.name!r} v{self.version}>"


_REGISTRY: dict = {}


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    """Make ``fmt`` available by its name; a second format of the same name or metadata prefix is a ValueError."""
    if not isinstance(fmt, CheckpointFormat):
        raise TypeError(f"expected a CheckpointFormat instance, got {type(fmt).__name__}")
    if not fmt.name or not fmt.metadata_prefix:
        raise ValueError(f"{type(fmt).__name__}: a format needs a name and a metadata_prefix")
    for other in _REGISTRY.values():
        if other.name == fmt.name or other.metadata_prefix == fmt.metadata_prefix:
            raise ValueError(f"format {fmt.name!r} clashes with the registered {other!r}")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str = DEFAULT_FORMAT) -> CheckpointFormat:
    """The registered format called ``name``; ``ValueError`` listing the known ones otherwise."""
    fmt = _REGISTRY.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"unknown checkpoint format {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return fmt


def format_names() -> list:
    """The registered formats' names, sorted: the choices of ``--format`` on both command lines."""
    return sorted(_REGISTRY)


#: Outputs that are files of their own rather than formats of tensors inside safetensors checkpoints: a GGUF file
#: has its own container, metadata and tensor names (:mod:`qcore.formats.gguf_model` says why it is no
#: :class:`CheckpointFormat`). Both command lines offer them beside :func:`format_names`.
FILE_FORMATS = ("gguf",)


def output_format_names() -> list:
    """The choices of ``--format`` on both command lines: the checkpoint formats, then :data:`FILE_FORMATS`."""
    return format_names() + [f for f in FILE_FORMATS if f not in _REGISTRY]


def format_of(metadata: Mapping[str, str], path: str = "") -> CheckpointFormat:
    """The format whose metadata keys ``metadata`` holds; the default format when none does (a plain file)."""
    claimed = [f for f in _REGISTRY.values() if any(f.owns_key(k) for k in metadata)]
    if len(claimed) > 1:
        raise ValueError(f"{path}: metadata of several checkpoint formats ({', '.join(f.name for f in claimed)}); "
                         "a file holds one")
    return claimed[0] if claimed else get_format(DEFAULT_FORMAT)


from . import native  # noqa: E402  (registers "qcore")
from . import compressed_tensors  # noqa: E402,F401  (registers "compressed-tensors")
