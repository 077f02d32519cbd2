"""Segmentation datasets: the PASCAL VOC layout (with the SBD-augmented split source) and plain folder pairs."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..image import opened_image, read_image
from ..inputs import IMAGE_SUFFIXES
from ..transforms import VOC_CLASSES

__all__ = [
    "SegmentationDataset",
    "VOCSegmentation",
    "FolderSegmentation",
    "open_dataset",
    "read_label_map",
    "pair_tensors",
    "default_class_names",
    "IGNORE_INDEX",
    "VOC_CLASS_NAMES",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
"""Label value that marks pixels to ignore (object boundaries in VOC, padding in training crops)."""

VOC_CLASS_NAMES = VOC_CLASSES

# A transform takes (image (H, W, 3) uint8, label (H, W) int64, rng) and returns the pair transformed.
Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG (palette or greyscale; the value of a pixel is its class, 255 = ignore) as (H, W) int64.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not an image, or is a colour image (labels must be palette indices or grey values).
    """
    with opened_image(path, "label map") as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(
                f"label map {path} is a {im.mode} image; expected a palette (P) or greyscale (L) PNG whose "
                "pixel values are class indices"
            )
        return np.asarray(im).astype(np.int64)


def default_class_names(num_classes: int) -> list[str]:
    """The 21 VOC names when ``num_classes == 21``, otherwise ``class_0``, ``class_1``, ..."""
    if num_classes == len(VOC_CLASS_NAMES):
        return list(VOC_CLASS_NAMES)
    return [f"class_{i}" for i in range(num_classes)]


def check_labels(label: np.ndarray, num_classes: int, source: str) -> None:
    """Raise ``ValueError`` if ``label`` holds a value outside ``0..num_classes-1`` other than 255."""
    bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))
    if bad.any():
        values = sorted({int(v) for v in np.unique(label[bad])})
        raise ValueError(
            f"{source}: label values {values[:8]} lie outside the class range 0..{num_classes - 1} "
            f"(and are not the ignore value {IGNORE_INDEX}); check --num-classes"
        )


def pair_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample as tensors: the (H, W, 3) uint8 image as (3, H, W), the label map as (H, W) int64."""
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    label_t = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
    return image_t, label_t


class SegmentationDataset(Dataset):
    """(image, label map) pairs from a list of files.

    Random transforms draw from ``np.random.default_rng([seed, epoch, index])``, so a sample depends only on the seed,
    the epoch (see :meth:`set_epoch`) and its index: the same in any worker, process or resumed run.

    Args:
        samples: (image path, label path) pairs.
        num_classes: number of classes; label values must lie in ``0..num_classes-1`` or be 255.
        class_names: one name per class (default: :func:`default_class_names`).
        transform: a :class:`~crfasrnn.data.TrainTransform` / :class:`~crfasrnn.data.EvalTransform` or any callable
            ``(image, label, rng) -> (image, label)``.
        seed: seed of the random transforms.

    Shape:
        - image: (3, H, W) uint8 RGB tensor.
        - label: (H, W) int64 tensor.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, Path]],
        *,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        transform: Transform | None = None,
        seed: int = 0,
        name: str = "dataset",
    ) -> None:
        if num_classes < 1 or num_classes > IGNORE_INDEX:
            raise ValueError(f"num_classes must lie in 1..{IGNORE_INDEX}, got {num_classes}")
        names = list(class_names) if class_names is not None else default_class_names(num_classes)
        if len(names) != num_classes:
            raise ValueError(f"got {len(names)} class names for {num_classes} classes")
        if not samples:
            raise ValueError(f"{name} has no samples")
        self.samples = [(Path(i), Path(m)) for i, m in samples]
        self.num_classes = num_classes
        self.class_names = names
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.name = name

    @property
    def ids(self) -> list[str]:
        """Sample names: the stems of the label files."""
        return [m.stem for _, m in self.samples]

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random transforms :meth:`__getitem__` draws (call before making the loader)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The untransformed pair: (H, W, 3) uint8 RGB and (H, W) int64 labels, checked against each other."""
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        label = read_label_map(label_path)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label map {label_path} is "
                f"{label.shape[1]}x{label.shape[0]}"
            )
        check_labels(label, self.num_classes, str(label_path))
        return image, label

    def rng(self, index: int) -> np.random.Generator:
        """The random generator of sample ``index``'s transform in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        if self.transform is not None:
            image, label = self.transform(image, label, self.rng(index))
        return pair_tensors(image, label)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} samples, {self.num_classes} classes)"


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _voc_root(root: Path) -> Path | None:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return None


class VOCSegmentation(SegmentationDataset):
    """The PASCAL VOC segmentation layout.

    ``root`` may be the ``VOC2012`` folder itself, or a folder holding ``VOC2012/`` or ``VOCdevkit/VOC2012/``.
    The split list is ``ImageSets/Segmentation/{split}.txt`` (labels in ``SegmentationClass/``); if there is none,
    ``ImageSets/SegmentationAug/{split}.txt`` (labels in ``SegmentationClassAug/``, the SBD-augmented set converted to
    PNGs as DeepLab distributes it, e.g. split ``train_aug``).

    Example:
        >>> import tempfile
        >>> from crfasrnn.data import make_synthetic_voc
        >>> root = make_synthetic_voc(tempfile.mkdtemp(), num_train=2, num_val=1, size=(24, 32))
        >>> VOCSegmentation(root, "train", num_classes=4)
        VOCSegmentation('voc:train', 2 samples, 4 classes)
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, num_classes: int = 21, **kwargs) -> None:
        given = Path(root)
        voc = _voc_root(given)
        if voc is None:
            raise FileNotFoundError(
                f"{given} is not a PASCAL VOC folder (no JPEGImages/ in it, VOC2012/ or VOCdevkit/)"
            )
        sources = [
            (voc / "ImageSets" / "Segmentation" / f"{split}.txt", voc / "SegmentationClass"),
            (voc / "ImageSets" / "SegmentationAug" / f"{split}.txt", voc / "SegmentationClassAug"),
        ]
        found = next(((lst, labels) for lst, labels in sources if lst.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"no split list for split {split!r}: looked for {sources[0][0]} and {sources[1][0]}"
            )
        list_file, label_dir = found
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        samples, missing = [], []
        for stem in ids:
            image = _find_image(voc / "JPEGImages", stem)
            label = label_dir / f"{stem}.png"
            if image is None or not label.is_file():
                missing.append(str(label if image is not None else voc / "JPEGImages" / f"{stem}.jpg"))
                continue
            samples.append((image, label))
        if missing:
            raise FileNotFoundError(f"{len(missing)} files listed in {list_file} are missing, e.g. {missing[0]}")
        logger.info("VOC split %s: %d samples from %s", split, len(samples), list_file)
        super().__init__(samples, num_classes=num_classes, name=f"voc:{split}", **kwargs)


class FolderSegmentation(SegmentationDataset):
    """Images in one folder and label maps (PNG) in another, matched by file stem.

    Every image must have a label map; label maps without an image are skipped with a warning.
    """

    def __init__(
        self, images_dir: str | os.PathLike, masks_dir: str | os.PathLike, *, num_classes: int = 21, **kwargs
    ) -> None:
        images_dir, masks_dir = Path(images_dir), Path(masks_dir)
        for folder in (images_dir, masks_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"folder not found: {folder}")
        images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        masks = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.suffix.lower() == ".png"}
        unmatched = sorted(set(images) - set(masks))
        if unmatched:
            raise FileNotFoundError(
                f"{len(unmatched)} images in {images_dir} have no label map in {masks_dir}, e.g. {unmatched[0]}"
            )
        extra = sorted(set(masks) - set(images))
        if extra:
            logger.warning("%d label maps in %s have no image (skipped), e.g. %s", len(extra), masks_dir, extra[0])
        samples = [(images[s], masks[s]) for s in sorted(images)]
        super().__init__(samples, num_classes=num_classes, name=f"folder:{images_dir}", **kwargs)


def _read_class_names(root: Path) -> list[str] | None:
    path = root / "classes.txt"
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def open_dataset(
    root: str | os.PathLike,
    split: str,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    transform: Transform | None = None,
    seed: int = 0,
) -> SegmentationDataset:
    """Open split ``split`` of the dataset under ``root``, whichever layout it has.

    Layouts, tried in order: PASCAL VOC (:class:`VOCSegmentation`); ``root/{split}/images`` + ``root/{split}/masks``
    (:class:`FolderSegmentation`). The class names come from ``class_names``, else from ``root/classes.txt`` (one
    name per line), else :func:`default_class_names`; ``num_classes`` defaults to their count, or 21.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if class_names is None:
        class_names = _read_class_names(root)
        if class_names is None and (voc_root := _voc_root(root)) is not None:
            class_names = _read_class_names(voc_root)
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            logger.warning(
                "classes.txt names %d classes but num_classes is %d; ignoring it", len(class_names), num_classes
            )
            class_names = None
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else len(VOC_CLASS_NAMES)
    if _voc_root(root) is not None:
        return VOCSegmentation(
            root, split, num_classes=num_classes, class_names=class_names, transform=transform, seed=seed
        )
    if (root / split / "images").is_dir():
        return FolderSegmentation(
            root / split / "images",
            root / split / "masks",
            num_classes=num_classes,
            class_names=class_names,
            transform=transform,
            seed=seed,
        )
    raise FileNotFoundError(
        f"{root} has no known dataset layout for split {split!r}: expected JPEGImages/ + SegmentationClass/ + "
        f"ImageSets/Segmentation/{split}.txt (PASCAL VOC) or {split}/images/ + {split}/masks/"
    )
