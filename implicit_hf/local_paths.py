"""Telling a local path from a hub id, for arguments that may be either (imports only the standard library)."""

from __future__ import annotations

import os
from pathlib import Path


def looks_local(spec: str) -> bool:
    """Whether a model argument that is not an existing path still names a local one (never to be looked up
    on the hub): it starts with '.', '~' or a separator, has a backslash, more than one '/', or its first
    component is an existing folder (``outputs/run``). A hub id is ``name`` or ``owner/name``."""
    if spec.startswith((".", "~", "/", os.sep)) or "\\" in spec or spec.count("/") > 1 or spec.endswith("/"):
        return True
    return "/" in spec and Path(spec.split("/")[0]).is_dir()
