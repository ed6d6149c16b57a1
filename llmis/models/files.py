"""Find model files: paths inside the models dir, or files carried by installed packages.

A package resource is written ``dist-name:path/inside/dist.gguf``. It is found through the
distribution's file list (``importlib.metadata``), so the package is never imported just to
find it. A distribution that does not carry the file itself but ships an ``assemble(path)``
function (the chunked Gemma package does) has the file built once into
``<models_dir>/.assembled/`` and reused from then on.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from pathlib import Path

from llmis.errors import ModelFileError

__all__ = ["distribution_file", "resolve_resource", "safe_model_path"]

logger = logging.getLogger(__name__)
_assemble_lock = threading.Lock()


def _top_level_modules(dist: importlib.metadata.Distribution) -> list[str]:
    text = dist.read_text("top_level.txt") or ""
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return names or [dist.metadata["Name"].replace("-", "_")]


def distribution_file(dist: importlib.metadata.Distribution, inner: str) -> Path | None:
    """The installed file ``inner`` (a path in the distribution, or its tail) of ``dist``."""
    for file in dist.files or ():
        if str(file) == inner or (inner and str(file).endswith("/" + inner)):
            located = Path(str(file.locate()))
            if located.is_file():
                return located
    return None


def resolve_resource(resource: str, models_dir: Path) -> Path:
    """Return the on-disk path of ``dist-name:path/in/dist``; assemble it if need be."""
    dist_name, _, inner = resource.partition(":")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(
            f"package {dist_name!r} is not installed (needed for resource {resource!r}); "
            f"install it with: pip install {dist_name}"
        ) from None
    located = distribution_file(dist, inner)
    if located is not None:
        return located
    target = models_dir / ".assembled" / Path(inner).name
    if target.is_file():
        return target
    for module_name in _top_level_modules(dist):
        module = importlib.import_module(module_name)
        assemble = getattr(module, "assemble", None)
        if callable(assemble):
            with _assemble_lock:
                if not target.is_file():
                    logger.info("assembling %s into %s (once)", resource, target)
                    partial = target.with_suffix(target.suffix + ".partial")
                    partial.unlink(missing_ok=True)
                    assemble(partial)
                    partial.replace(target)
            return target
    raise ModelFileError(f"package {dist_name!r} has no file {inner!r}")


def safe_model_path(path: Path, models_dir: Path) -> Path:
    """Resolve ``path`` (relative to ``models_dir`` unless absolute) and refuse escapes.

    The resolved path, symlinks followed, must stay inside ``models_dir``. Errors name the
    path as given, never the server's directories; a name the OS refuses (a NUL byte, too
    long) is a 400.
    """
    shown = _shown(path)
    try:
        base = models_dir.resolve()
        candidate = path if path.is_absolute() else models_dir / path
        resolved = candidate.resolve()
        inside = resolved.is_relative_to(base)
        found = inside and resolved.is_file()
    except (OSError, ValueError):  # ENAMETOOLONG, ELOOP, "embedded null byte"
        raise ModelFileError(f"model path {shown} is not a valid file name") from None
    if not inside:
        raise ModelFileError(f"model path {shown} leads outside the models dir", status=403)
    if not found:
        raise ModelFileError(f"model file {shown} not found in the models dir", status=404)
    return resolved


def _shown(path: Path, limit: int = 200) -> str:
    """``path`` quoted for an error message, cut to ``limit`` characters."""
    text = str(path)
    return repr(text if len(text) <= limit else text[:limit] + "...")
