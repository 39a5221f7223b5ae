"""vitport's error family. Every error vitport raises on purpose is a ``VitportError``.

Each subclass also derives from the built-in exception a caller would catch for that kind of
problem (``ValueError`` for bad values, ``OSError`` subclasses for paths and the network), so
``except ValueError`` keeps working. The CLI prints a ``VitportError`` as one paragraph and
exits non-zero; any other exception is a bug in vitport and keeps its traceback.
"""

from __future__ import annotations


class VitportError(Exception):
    """Base of every deliberate vitport error: the message names the problem and the fix."""


class ConversionError(VitportError, ValueError):
    """A checkpoint or param tree does not match the architecture it is converted for.

    ``problems`` lists every mismatch found (missing keys, unexpected keys, wrong shapes,
    non-finite values); the message shows them grouped so one read tells the whole story.
    """

    def __init__(self, summary: str, problems: dict[str, list[str]] | None = None):
        self.summary = summary
        self.problems = {k: v for k, v in (problems or {}).items() if v}
        super().__init__(self._format())

    def _format(self) -> str:
        lines = [self.summary]
        for kind, items in self.problems.items():
            shown = items[:20]
            more = f" (+{len(items) - len(shown)} more)" if len(items) > len(shown) else ""
            lines.append(f"  {kind} ({len(items)}){more}: " + ", ".join(shown))
        return "\n".join(lines)


class UnsupportedArchitectureError(VitportError, ValueError):
    """A timm model or setting that vitport does not implement; the message names it."""


class InvalidArgumentError(VitportError, ValueError):
    """An argument (keyword, CLI flag, input array) has a value vitport cannot use."""


class CheckpointError(VitportError, ValueError):
    """A checkpoint file cannot be read: corrupt, truncated, of an unknown kind, or refused."""


class MissingFileError(VitportError, FileNotFoundError):
    """A file or folder that was named, or that a folder should hold, does not exist."""


class OutputExistsError(VitportError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class HubError(VitportError, OSError):
    """The hub answered, but not with what was asked for (no such repo, revision or file)."""


class HubUnreachableError(VitportError, ConnectionError):
    """The hub was needed, could not be reached, and the files are not in the local cache."""


class OutputWriteError(VitportError, OSError):
    """Writing the output failed (disk full, quota, read-only, permissions); nothing was left."""
