"""The one atomic writer: every result, checkpoint and converted model appears whole or not at all.

It lives in ``envs`` because that is the lowest package that writes files (``envs.model`` converts
the embedded GGUF into an HF directory); agents and experiments import it from here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)``, then rename ``tmp`` onto ``path``; returns ``path``.

    ``tmp`` has the same file name as ``path`` (inside a private temporary directory next to it),
    so writers that choose a format by suffix (``savefig``, SB3's ``save``, which appends ".zip" to
    other names) write what the target expects. ``write`` may create a file or a directory. If it
    raises, nothing is left behind and an existing ``path`` is untouched. A directory target that
    already exists and is not empty cannot be replaced: the rename raises ``OSError``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        tmp = os.path.join(tmp_dir, path.name)
        write(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
