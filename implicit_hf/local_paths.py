"""Local paths given by users (imports only the standard library): telling a local path from a hub id, for
arguments that may be either; finding out whether an output folder can be written before any work is done."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def looks_local(spec: str) -> bool:
    """Whether a model argument that is not an existing path still names a local one (never to be looked up
    on the hub): it starts with '.', '~' or a separator, has a backslash, more than one '/', or its first
    component is an existing folder (``outputs/run``). A hub id is ``name`` or ``owner/name``."""
    if spec.startswith((".", "~", "/", os.sep)) or "\\" in spec or spec.count("/") > 1 or spec.endswith("/"):
        return True
    return "/" in spec and Path(spec.split("/")[0]).is_dir()


def check_writable_folder(path: Path, keep: bool) -> None:
    """Create ``path`` (with its parents) and write a file in it, removed at once; an ``OSError`` when that fails
    (a path under a file, a place that cannot be written). The folders created are removed again unless ``keep``.
    A file at ``path`` itself is the caller's to refuse first, naming its option."""
    created = [folder for folder in (path, *path.parents) if not folder.exists()]  # innermost first
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    finally:
        if not keep:
            for folder in created:
                with contextlib.suppress(OSError):  # one made meanwhile by another process, or never made
                    folder.rmdir()
