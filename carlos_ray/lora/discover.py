"""Discovery of LoRA files under a directory: safetensors candidates, pickle files and symlink loops reported."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Iterator

from carlos_ray.lora.header import LoraRejected, pickle_extension_reject

logger = logging.getLogger(__name__)


def _entry(entry: os.DirEntry, follow_symlinks: bool) -> tuple[str, Path | LoraRejected | None]:
    """("dir", path) / ("link-dir", path) for a directory, ("file", path or rejection) for a file, ("", maybe rejection)."""
    p = Path(entry.path)
    is_link = entry.is_symlink()
    if is_link and not follow_symlinks:
        logger.debug("skipping symlink %s", p)
        return "", None
    try:
        is_dir = entry.is_dir(follow_symlinks=True)
        is_file = entry.is_file(follow_symlinks=True)
    except OSError:
        is_dir = is_file = False
    if is_link and not (is_dir or is_file):
        try:
            os.stat(p)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "", LoraRejected("symlink_loop", "symlink loop", p)
            if p.suffix.lower() == ".safetensors":
                return "", LoraRejected("not_found", "broken symlink", p)
        return "", None
    if is_dir:
        return ("link-dir" if is_link else "dir"), p
    if is_file:
        return "file", p if p.suffix.lower() == ".safetensors" else pickle_extension_reject(p)
    return "", None


def discover_loras(
    root: str | os.PathLike[str], *, follow_symlinks: bool = True
) -> Iterator[Path | LoraRejected]:
    """Walk ``root`` for ``*.safetensors`` files (sorted, depth first).

    Yields a Path per candidate, and a LoraRejected for each pickle-extension file (``pickle``),
    directory symlink that leads back to one of its ancestors (``symlink_loop``), broken/looping
    file symlink, and unreadable directory. A directory reached twice via symlinks is walked once.
    With ``follow_symlinks=False`` symlinks are skipped entirely.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise NotADirectoryError(f"LoRA root {str(root)!r} is not a directory")
    real_root = os.path.realpath(root_path)
    visited: set[str] = {real_root}
    # stack of (dir path, tuple of real paths of it and its ancestors)
    stack: list[tuple[Path, tuple[str, ...]]] = [(root_path, (real_root,))]
    while stack:
        directory, ancestors = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield LoraRejected("unreadable", f"cannot list directory: {exc.strerror}", directory)
            continue
        subdirs: list[tuple[Path, bool]] = []
        for entry in entries:
            kind, item = _entry(entry, follow_symlinks)
            if kind in ("dir", "link-dir"):
                subdirs.append((item, kind == "link-dir"))
            elif item is not None:
                yield item
        # Claim real directories before symlinked aliases of them, so files keep their real paths.
        push: list[tuple[Path, tuple[str, ...]]] = []
        for p, is_link in sorted(subdirs, key=lambda item: item[1]):
            real = os.path.realpath(p)
            if real in ancestors:
                yield LoraRejected("symlink_loop", f"directory symlink leads back to its ancestor {real}", p)
            elif real in visited:
                logger.debug("skipping %s: %s already walked", p, real)
            else:
                visited.add(real)
                push.append((p, ancestors + (real,)))
        stack.extend(sorted(push, key=lambda item: item[0].name, reverse=True))
