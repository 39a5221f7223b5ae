"""jax's persistent compilation cache for the ``vitport`` command.

Every ``vitport predict`` / ``embed`` / ``attention`` / ``verify`` / ``finetune`` is a fresh
process, and XLA's compile is most of a small job's first call (cait_s24_224 scanned: about 1 s
cold against 0.33-0.53 s from a warm cache, ``benchmarks/README.md``). So the command keeps jax's
cache on disk, in a folder per jax version and CPU: an executable compiled for one CPU's
instruction set is never handed to another sharing the same home folder.

- ``VITPORT_COMPILATION_CACHE=<folder>``: the cache's parent folder (default
  ``$XDG_CACHE_HOME/vitport/xla``, i.e. ``~/.cache/vitport/xla``); ``0``, ``off``, ``false`` or
  empty turns it off.
- jax's own ``JAX_COMPILATION_CACHE_DIR`` (the user's choice) is left as it is.

Only the command does this (``vitport.cli.command_line``); ``import vitport`` leaves jax's
configuration alone, as a library should. Set through jax's environment variables before jax
is imported, so commands that compile nothing (``list``, ``info``) do not import jax for it.
"""

from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

CACHE_ENV = "VITPORT_COMPILATION_CACHE"
OFF = ("", "0", "off", "false", "no")
MIN_COMPILE_S = 0.2  # jax's default (1 s) would skip most of a ViT's compiles on a fast machine


def machine_tag() -> str:
    """A short hash of what an XLA CPU executable depends on: the architecture, the CPU model and
    its instruction-set flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f.read().splitlines()
                     if line.partition(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
        text += "\n".join(dict.fromkeys(lines))  # the first processor's lines (all processors repeat them)
    except OSError:
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_dir(environ: os._Environ | dict = os.environ) -> Path | None:
    """The folder the command's cache goes to, or None when off or already chosen by the user."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    value = environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in OFF:
        return None
    base = Path(value).expanduser() if value else (
        Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitport" / "xla")
    return base / f"jax-{metadata.version('jax')}-{platform.machine()}-{machine_tag()}"


def enable(environ: os._Environ | dict = os.environ) -> Path | None:
    """Point jax's persistent cache at ``cache_dir()`` (before jax is imported, through its
    environment variables; through ``jax.config`` if it already is). A folder that cannot be
    made (a read-only home, no home at all) leaves the cache off: compiling as before beats
    failing."""
    try:
        folder = cache_dir(environ)
        if folder is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError, metadata.PackageNotFoundError):  # no home folder, no jax metadata
        return None
    environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(MIN_COMPILE_S))
    import sys

    if environ is os.environ and "jax" in sys.modules:  # already imported: it read the environment then
        import jax

        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    return folder
