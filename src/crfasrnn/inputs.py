"""The files a command works on: the images a path, folder or glob pattern names, their counterparts, their outputs.

``crfasrnn segment`` takes any mix of paths, folders and patterns (:func:`expand_inputs`) and names each output after
its image (:func:`output_names`); ``crfasrnn refine`` pairs each image with its coarse labels or probabilities in a
folder (:func:`refine_jobs`). Which files count as images is decided here, once (:data:`IMAGE_SUFFIXES`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "expand_inputs", "images_in", "is_pattern", "output_names", "refine_jobs"]

#: The file suffixes (lower case) taken as images where a folder is listed, in the order a file is looked for by stem.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_pattern(text: str) -> bool:
    """Whether a command-line path is a glob pattern (``*``, ``?``, ``[``).

    Example:
        >>> is_pattern("photos/*.jpg"), is_pattern("photo.jpg")
        (True, False)
    """
    return glob.has_magic(text)


def images_in(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder (:data:`IMAGE_SUFFIXES`), sorted, not recursive."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image paths from paths, folders (their image files, sorted, not recursive) and glob patterns, in order.

    Duplicates are kept once. An explicit path that does not exist is kept (reading it reports the error), a folder
    or pattern that matches no image raises.

    Raises:
        ValueError: a folder or pattern without images, or no inputs at all.
    """
    out: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found = images_in(path)
            if not found:
                raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        elif glob.has_magic(text) and not path.exists():
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise ValueError(f"no files match {text}")
        else:
            found = [path]
        out.extend(found)
    if not out:
        raise ValueError("no input images given")
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def output_names(paths: Sequence[Path]) -> list[str]:
    """Output base names: the file's stem, made unique with ``_2``, ``_3``… where stems repeat.

    Example:
        >>> output_names([Path("a/x.jpg"), Path("b/x.png"), Path("y.jpg")])
        ['x', 'x_2', 'y']
    """
    counts: dict[str, int] = {}
    taken = {p.stem for p in paths}
    names = []
    for p in paths:
        n = counts.get(p.stem, 0) + 1
        counts[p.stem] = n
        name = p.stem if n == 1 else f"{p.stem}_{n}"
        while n > 1 and name in taken:
            n += 1
            name = f"{p.stem}_{n}"
        taken.add(name)
        names.append(name)
    return names


def refine_jobs(image: str, source: str, output: str | None, *, kind: str) -> list[tuple[Path, Path, Path]]:
    """``crfasrnn refine``'s (image, labels-or-probs, output) triples: one for a file, one per image for a folder or
    a glob pattern, whose counterparts are ``<source>/<image stem>.png`` (labels) or ``.npy`` (probabilities).

    Args:
        image: IMAGE as given: a file, a folder or a glob pattern.
        source: the ``--labels`` or ``--probs`` path: a file for one image, a folder for several.
        output: ``--output``: for one image a file (or a folder to write ``<stem>.png`` into; default
            ``<stem>_refined.png``), for several a folder (default ``refined``).
        kind: ``"labels"`` or ``"probs"``.

    Raises:
        FileNotFoundError: an image or counterpart that does not exist.
        ValueError: a file where a folder is needed (or the reverse), or images whose outputs would collide.
    """
    suffix = ".png" if kind == "labels" else ".npy"
    what = f"--{kind}"
    if not is_pattern(image) and not Path(image).is_dir():
        if not Path(image).is_file():
            raise FileNotFoundError(f"image not found: {image}")
        if Path(source).is_dir():
            raise ValueError(f"{what} {source} is a folder but IMAGE is a single file")
        target = Path(output) if output else Path(f"{Path(image).stem}_refined.png")
        if target.is_dir():
            target = target / f"{Path(image).stem}.png"
        return [(Path(image), Path(source), target)]
    images = sorted(Path(p) for p in glob.glob(image) if Path(p).is_file()) if is_pattern(image) else images_in(image)
    if not images:
        raise FileNotFoundError(f"no images match {image}")
    if not Path(source).is_dir():
        raise ValueError(f"IMAGE {image} names several images, so {what} must be a folder of <name>{suffix} files")
    stems = [p.stem for p in images]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"several images share the name {duplicates[0]!r}: their outputs would collide")
    out_dir = Path(output) if output else Path("refined")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} is a file, but several images need a folder")
    jobs = []
    for path in images:
        counterpart = Path(source) / f"{path.stem}{suffix}"
        if not counterpart.is_file():
            raise FileNotFoundError(f"{what}: no {counterpart} for image {path}")
        jobs.append((path, counterpart, out_dir / f"{path.stem}.png"))
    return jobs
