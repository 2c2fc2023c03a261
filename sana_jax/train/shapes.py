"""A procedural text-to-image data set for the main job on a CPU: coloured shapes with captions.

Images are 32x32 RGB in [-1, 1]: one circle, square or triangle of one of six colours, at a random place and
size on a dark background, captioned "a <colour> <shape>". Two stand-ins keep the job to minutes on 2 CPU cores,
and both are exact and documented rather than learned:
- latents: pixel-unshuffle by 4 (a lossless 32x32x3 <-> 8x8x48 reshape) instead of the DC-AE (which would
  compress 32x32 images to 1x1 latents);
- caption embeddings: a fixed random embedding per word ("<bos>" first, "<pad>" after, as Gemma's padded
  output) instead of Gemma-2, with SANA's null caption being the embedding of "" (just "<bos>").
`measure` recovers the colour and the shape from a generated image, so conditioning is measured, not eyeballed.
"""

from __future__ import annotations

import numpy as np

from sana_jax.train.data import Example

COLOURS = {  # RGB in [0, 1]
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1), "magenta": (0.9, 0.1, 0.9), "cyan": (0.1, 0.9, 0.9),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (0.12, 0.12, 0.12)
IMAGE_SIZE, FACTOR = 32, 4
VOCAB = ("<bos>", "<pad>", "a") + tuple(COLOURS) + SHAPES
MAX_LENGTH = 5  # <bos> a <colour> <shape> <pad>
CAPTION_CHANNELS = 32


def word_table(seed: int = 1234) -> np.ndarray:
    """[len(VOCAB), CAPTION_CHANNELS] fixed random word embeddings (unit variance)."""
    return np.random.default_rng(seed).standard_normal((len(VOCAB), CAPTION_CHANNELS)).astype(np.float32)


def encode_caption(caption: str, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """caption -> (y [MAX_LENGTH, C], mask [MAX_LENGTH]); "" gives the null caption (<bos> only)."""
    words = ["<bos>"] + caption.split()
    unknown = [w for w in words if w not in VOCAB]
    if unknown or len(words) > MAX_LENGTH:
        raise ValueError(f"caption {caption!r}: words {unknown} not in the demo vocabulary or longer than "
                         f"{MAX_LENGTH - 1} words")
    ids = [VOCAB.index(w) for w in words] + [VOCAB.index("<pad>")] * (MAX_LENGTH - len(words))
    mask = np.array([1] * len(words) + [0] * (MAX_LENGTH - len(words)), np.int32)
    return table[ids], mask


def render(colour: str, shape: str, rng: np.random.Generator) -> np.ndarray:
    """[32, 32, 3] in [-1, 1]."""
    n = IMAGE_SIZE
    size = rng.uniform(9, 15)
    cy, cx = rng.uniform(size / 2 + 1, n - size / 2 - 1, 2)
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    if shape == "circle":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size / 2) ** 2
    elif shape == "square":
        inside = (np.abs(yy - cy) <= size / 2) & (np.abs(xx - cx) <= size / 2)
    else:  # upward triangle inscribed in the size x size box
        top, bottom = cy - size / 2, cy + size / 2
        half_width = (yy - top) / size * size / 2
        inside = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)
    image = np.where(inside[..., None], COLOURS[colour], BACKGROUND).astype(np.float32)
    return image * 2.0 - 1.0


def to_latent(image: np.ndarray) -> np.ndarray:
    """[..., 32, 32, 3] -> [..., 8, 8, 48] (pixel unshuffle by 4, channels ordered (dy, dx, rgb))."""
    *lead, h, w, c = image.shape
    x = image.reshape(*lead, h // FACTOR, FACTOR, w // FACTOR, FACTOR, c)
    x = np.moveaxis(x, -4, -3)  # [..., h/4, w/4, dy, dx, c]
    return x.reshape(*lead, h // FACTOR, w // FACTOR, FACTOR * FACTOR * c)


def from_latent(latent: np.ndarray) -> np.ndarray:
    """Inverse of to_latent: [..., 8, 8, 48] -> [..., 32, 32, 3]."""
    *lead, h, w, _ = latent.shape
    x = latent.reshape(*lead, h, w, FACTOR, FACTOR, 3)
    x = np.moveaxis(x, -3, -4)  # [..., h, dy, w, dx, c]
    return x.reshape(*lead, h * FACTOR, w * FACTOR, 3)


def captions() -> list[str]:
    return [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]


def examples(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    table = word_table()
    for i in range(count):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        caption = f"a {colour} {shape}"
        y, mask = encode_caption(caption, table)
        yield Example(latent=to_latent(render(colour, shape, rng)), y=y, mask=mask, caption=caption)


def measure(image: np.ndarray) -> tuple[str | None, str | None]:
    """(colour, shape) recovered from a [32, 32, 3] image in [-1, 1]: the foreground is every pixel far from the
    background; its mean colour picks the nearest palette colour, its fill of the bounding box the shape
    (circle pi/4, square 1, triangle 1/2)."""
    rgb = (np.clip(image, -1, 1) + 1) / 2
    fg = np.linalg.norm(rgb - np.array(BACKGROUND), axis=-1) > 0.3
    if fg.sum() < 8:
        return None, None
    mean = rgb[fg].mean(0)
    colour = min(COLOURS, key=lambda c: np.linalg.norm(mean - np.array(COLOURS[c])))
    rows, cols = np.nonzero(fg)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = fg.sum() / box
    shape = min({"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}.items(), key=lambda kv: abs(kv[1] - fill))[0]
    return colour, shape
