"""Name patterns for choosing tensors or modules: an exact dotted name, an ``fnmatch`` glob, or ``re:<regex>``.

A pattern matches *whole* dotted names, and a pattern that matches a name also covers everything below it:
``layers.1`` matches ``layers.1`` and ``layers.1.mlp.fc1.weight`` but never ``layers.10``. Globs and regexes are
case-sensitive, ``*`` also crosses dots, and regexes must match a whole name (``re.fullmatch``).

>>> NamePattern("layers.1").matches("layers.10.weight"), NamePattern("layers.1").matches("layers.1.weight")
(False, True)
>>> NamePattern("re:.*\\\\.(q|k)_proj").matches("model.layers.0.q_proj.weight")
True
"""

from __future__ import annotations

import fnmatch
import re

__all__ = ["NamePattern"]


class NamePattern:
    """One name pattern; ``matches(name)`` tries it against ``name`` and each of its dotted ancestors."""

    __slots__ = ("text", "kind", "_rx")

    def __init__(self, text: str, what: str = "pattern"):
        if not isinstance(text, str):
            raise TypeError(f"{what} must be a dotted name, a glob or 're:<regex>', got {type(text).__name__}: "
                            f"{text!r}")
        if text in ("", "re:"):
            raise ValueError(f"{what} {text!r} is empty; give a dotted name such as 'lm_head'")
        self.text = text
        if text.startswith("re:"):
            self.kind = "regex"
            try:
                self._rx = re.compile(text[3:])
            except re.error as e:
                raise ValueError(f"{what} {text!r} is not a valid regular expression: {e}") from None
        elif any(c in text for c in "*?["):
            self.kind = "glob"
            self._rx = re.compile(fnmatch.translate(text))
        else:
            self.kind = "exact"
            self._rx = None

    def matches(self, name: str) -> bool:
        if self.kind == "exact":
            return name == self.text or name.startswith(self.text + ".")
        parts = name.split(".")
        return any(self._rx.fullmatch(".".join(parts[:i])) is not None for i in range(1, len(parts) + 1))

    def __repr__(self) -> str:
        return f"NamePattern({self.text!r})"
