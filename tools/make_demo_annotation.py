"""Make the demo's coarse annotation of the bundled photo: src/crfasrnn/data/astronaut_coarse.png.

A one-off, kept so that the file can be remade and changed: rough hand-placed polygons and ellipses for five classes
(0 background, 1 person, 2 flag, 3 shuttle model, 4 helmet), drawn on the 500x500 photo, reduced to a 10-pixel block
grid (what a low-resolution segmentation network gives) and given a band of "unknown" (255) 8 pixels either side of
every class boundary. Written as a palette PNG with the VOC colours (about 2 KB).

    python tools/make_demo_annotation.py [OUTPUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from crfasrnn.image import voc_palette

SIZE = 500
BLOCK = 10
BAND = 8  # unknown pixels on each side of a boundary
UNKNOWN = 255

# (label, kind, coordinates) drawn in this order (later shapes cover earlier ones); rough on purpose.
SHAPES = [
    (2, "polygon", [(0, 0), (72, 0), (86, 110), (92, 235), (48, 300), (22, 380), (16, 500), (0, 500)]),  # flag
    (
        3,
        "polygon",
        [
            (388, 4),
            (424, 4),
            (446, 60),
            (444, 210),
            (452, 232),
            (420, 262),
            (364, 262),
            (346, 216),
            (372, 172),
            (374, 60),
        ],
    ),  # shuttle model
    (1, "ellipse", [(148, 12), (296, 190)]),  # head and hair
    (
        1,
        "polygon",
        [
            (112, 150),
            (296, 150),
            (300, 215),
            (342, 255),
            (356, 330),
            (300, 420),
            (296, 500),
            (26, 500),
            (20, 420),
            (30, 320),
            (62, 252),
            (112, 212),
        ],
    ),  # neck ring and suit
    (4, "ellipse", [(272, 334), (500, 560)]),  # helmet
]


def make_annotation() -> np.ndarray:
    canvas = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for label, kind, coords in SHAPES:
        getattr(draw, kind)(coords, fill=label)
    blocky = canvas.resize((SIZE // BLOCK, SIZE // BLOCK), Image.NEAREST).resize((SIZE, SIZE), Image.NEAREST)
    size = 2 * BAND + 1
    high = np.asarray(blocky.filter(ImageFilter.MaxFilter(size)))
    low = np.asarray(blocky.filter(ImageFilter.MinFilter(size)))
    labels = np.asarray(blocky).copy()
    labels[high != low] = UNKNOWN
    return labels


def main(argv: list[str]) -> None:
    default = Path(__file__).resolve().parents[1] / "src" / "crfasrnn" / "data" / "astronaut_coarse.png"
    out = Path(argv[0]) if argv else default
    im = Image.fromarray(make_annotation(), mode="P")
    im.putpalette(voc_palette().reshape(-1).tolist())
    im.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
