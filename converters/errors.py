"""Errors the converter raises. Each one carries every problem found, not just the first."""

from __future__ import annotations


class ConversionError(ValueError):
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


class UnsupportedArchitectureError(ValueError):
    """A timm model or setting that vitport does not implement; the message names it."""
