"""Input sources: an image folder, a ``.npz``/``.npy`` array, or scikit-learn's 8x8 digits.

Each source becomes a list of :class:`Item` in a deterministic order, the class names, and a
fingerprint of the inputs (so ``make`` can tell when existing shards are still up to date).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np


class DataPrepError(ValueError):
    """Bad input or arguments, with a one-line message naming the file/key/value."""


class SourceKind(str, Enum):
    DIGITS = "digits"
    FOLDER = "folder"
    NPZ = "npz"


IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".tga"}
)
IMAGES_KEYS = ("images", "x", "X", "image", "data", "arr_0")
LABELS_KEYS = ("labels", "y", "Y", "label", "targets", "arr_1")


@dataclass(frozen=True)
class Item:
    index: int
    """Position in the source's own deterministic order; also the sample key in the shards."""
    name: str
    """How errors refer to this input (a relative path, or ``file.npz[17]``)."""
    label: int = -1
    """Class index, or -1 when the source has no labels."""
    path: str | None = None
    """File to decode (folder source)."""
    pixels: np.ndarray | None = None
    """uint8 HxW or HxWxC image (array sources)."""


@dataclass
class SourceData:
    items: list[Item]
    class_names: list[str]
    fingerprint: str
    """Hash of the input's identity (file list with sizes and mtimes, or array bytes)."""
    description: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- digits

DIGITS_FINGERPRINT = "sklearn.datasets.load_digits:1797x8x8"
"""The bundled digits never change; a constant lets ``make`` say "up to date" without importing sklearn."""


def load_digits_source() -> SourceData:
    """scikit-learn's 1797 8x8 digits; values 0..16 scaled to 0..255 (rounded)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataPrepError("--source digits needs scikit-learn: pip install 'iddpm-train[digits]'") from None
    digits = load_digits()
    images = np.rint(np.asarray(digits.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(digits.target, dtype=np.int64)
    items = [Item(i, f"digits[{i}]", int(labels[i]), pixels=images[i]) for i in range(len(images))]
    return SourceData(
        items=items,
        class_names=[str(c) for c in range(10)],
        fingerprint=DIGITS_FINGERPRINT,
        description={"kind": SourceKind.DIGITS.value, "count": len(items)},
    )


# --------------------------------------------------------------------------- folder


def _image_files(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursive), sorted by relative path; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def load_folder_source(root: Path) -> SourceData:
    """A flat folder (unlabeled) or one subfolder per class (labels = sorted subfolder names)."""
    if not root.is_dir():
        raise DataPrepError(f"--input {root}: not a directory")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    top_images = [
        e
        for e in entries
        if e.is_file() and not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS
    ]
    subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    class_dirs = [(d.name, files) for d in subdirs if (files := _image_files(Path(d.path)))]
    if top_images and class_dirs:
        raise DataPrepError(
            f"--input {root}: has both image files and subfolders with images; "
            "use a flat folder (unlabeled) or one subfolder per class"
        )
    items: list[Item] = []
    h = hashlib.sha256()
    if class_dirs:
        class_names = [name for name, _ in class_dirs]
        labelled = [(label, path) for label, (_, files) in enumerate(class_dirs) for path in files]
    else:
        class_names = []
        labelled = [(-1, Path(e.path)) for e in top_images]
    if not labelled:
        raise DataPrepError(f"--input {root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    for index, (label, path) in enumerate(labelled):
        rel = path.relative_to(root).as_posix()
        st = path.stat()
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{label}\n".encode())
        items.append(Item(index, rel, label, path=str(path)))
    return SourceData(
        items=items,
        class_names=class_names,
        fingerprint=h.hexdigest(),
        description={"kind": SourceKind.FOLDER.value, "input": str(root.resolve()), "count": len(items)},
    )


# --------------------------------------------------------------------------- arrays


def file_fingerprint(path: Path) -> str:
    """Identity of an input file by path, size and modification time (hashing gigabytes is not "fast")."""
    if not path.is_file():
        raise DataPrepError(f"--input {path}: file not found")
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}\t{st.st_size}\t{st.st_mtime_ns}".encode()).hexdigest()


def _to_uint8_images(arr: np.ndarray, where: str) -> np.ndarray:
    """(N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1/3/4, any numeric dtype → uint8 (N,H,W[,C]).

    Floats in [0, 1] are scaled by 255, floats in [-1, 1] (some negative) are mapped by
    (x+1)·127.5, anything else is taken as 0..255 and clipped; uint16 is scaled by 255/65535.
    """
    if arr.ndim == 4 and arr.shape[1] in (1, 3, 4) and arr.shape[3] not in (1, 3, 4):
        arr = arr.transpose(0, 2, 3, 1)
    if not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[3] in (1, 3, 4))):
        raise DataPrepError(f"{where}: expected images shaped (N,H,W), (N,H,W,C) or (N,C,H,W), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return np.rint(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.number):
        raise DataPrepError(f"{where}: images must be numeric, got dtype {arr.dtype}")
    x = arr.astype(np.float64)
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if np.issubdtype(arr.dtype, np.floating) and lo >= -1.0 and hi <= 1.0:
        x = (x + 1.0) * 127.5 if lo < 0 else x * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _pick_key(keys: list[str], wanted: str | None, candidates: tuple[str, ...], where: str, what: str) -> str | None:
    if wanted is not None:
        if wanted not in keys:
            raise DataPrepError(f"{where}: no array named {wanted!r} for {what} (arrays: {', '.join(keys)})")
        return wanted
    return next((k for k in candidates if k in keys), None)


def load_array_source(
    path: Path,
    images_key: str | None = None,
    labels_key: str | None = None,
    class_names: list[str] | None = None,
) -> SourceData:
    """``.npy`` (images only) or ``.npz`` (images + optional labels + optional ``class_names``)."""
    if not path.is_file():
        raise DataPrepError(f"--input {path}: file not found")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataPrepError(f"--input {path}: cannot read as .npy/.npz ({err})") from None
    labels = None
    stored_names = None
    if isinstance(loaded, np.ndarray):
        images = loaded
    else:
        with loaded:
            keys = list(loaded.keys())
            ikey = _pick_key(keys, images_key, IMAGES_KEYS, str(path), "images")
            if ikey is None:
                raise DataPrepError(f"{path}: no images array (tried {', '.join(IMAGES_KEYS)}); use --images-key")
            lkey = _pick_key(keys, labels_key, LABELS_KEYS, str(path), "labels")
            images = loaded[ikey]
            labels = loaded[lkey] if lkey is not None else None
            stored_names = loaded["class_names"] if "class_names" in keys else None
    images = _to_uint8_images(images, str(path))
    n = len(images)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != n or not np.issubdtype(labels.dtype, np.integer):
            raise DataPrepError(f"{path}: labels must be {n} integers, got shape {labels.shape} dtype {labels.dtype}")
        if n and labels.min() < 0:
            raise DataPrepError(f"{path}: labels must be >= 0, got {int(labels.min())}")
        num = int(labels.max()) + 1 if n else 0
        if class_names is None and stored_names is not None:
            class_names = [str(c) for c in np.asarray(stored_names).reshape(-1)]
        if class_names is None:
            class_names = [str(c) for c in range(num)]
        if len(class_names) < num:
            raise DataPrepError(f"{path}: {len(class_names)} class names for labels up to {num - 1}")
    else:
        class_names = []
    items = [
        Item(i, f"{path.name}[{i}]", int(labels[i]) if labels is not None else -1, pixels=images[i]) for i in range(n)
    ]
    if not items:
        raise DataPrepError(f"{path}: no images")
    return SourceData(
        items=items,
        class_names=list(class_names),
        fingerprint=file_fingerprint(path),
        description={"kind": SourceKind.NPZ.value, "input": str(path.resolve()), "count": n},
    )
