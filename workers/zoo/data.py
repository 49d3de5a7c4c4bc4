"""Task datasets: what an edge camera would send the access point.

Both tasks are small grayscale images, FP32 in [0, 1], shaped ``(N, 1, H, W)``:

- ``digits``: the scikit-learn handwritten digits (8x8) as a camera sees them,
  placed at a random position on a 10x10 canvas, with slight defocus blur,
  low and uneven contrast, sometimes an occluding patch, and sensor noise. Clean digits are too
  easy (a 2k-parameter MLP scores 96%), so that accuracy would not depend on
  model size. Several corrupted copies of every image enlarge the data; the
  held-out split is disjoint at the level of the original images.
- ``shapes``: synthetic 16x16 images of eight geometric shape classes (filled
  and outlined, randomly placed, sized and rotated) among clutter strokes,
  with uneven lighting and noise. Filled versus outlined and triangle versus
  square take spatial reasoning that a tiny linear-ish model lacks.

Everything is drawn from a seeded ``np.random.Generator``: the same seed gives
the same arrays, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

TASKS = ("digits", "shapes")

DIGITS_CANVAS = 10
SHAPES_CANVAS = 16
SHAPES_JITTER = 2.5  # pixels
SHAPE_CLASSES = (
    "disk",
    "ring",
    "square",
    "frame",
    "triangle",
    "triangle-outline",
    "cross",
    "ellipse",
)


@dataclass(frozen=True, slots=True)
class TaskData:
    """A task's train and held-out splits."""

    name: str
    x_train: FloatArray  # (N, 1, H, W)
    y_train: IntArray  # (N,)
    x_test: FloatArray
    y_test: IntArray
    class_names: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape, without the batch dimension."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True, slots=True)
class DataSize:
    """How much data to generate; the quick profile shrinks it."""

    digits_train_copies: int = 8
    digits_test_copies: int = 4
    shapes_train: int = 12000
    shapes_test: int = 2400


def make_task(name: str, seed: int, size: DataSize | None = None) -> TaskData:
    size = size or DataSize()
    # One independent stream per task, so that adding a task never changes another's data.
    rng = np.random.default_rng([seed, TASKS.index(name)])
    if name == "digits":
        return _make_digits(rng, size)
    if name == "shapes":
        return _make_shapes(rng, size)
    raise KeyError(f"unknown task {name!r} (known: {', '.join(TASKS)})")


# --- digits -------------------------------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.25


def _make_digits(rng: np.random.Generator, size: DataSize) -> TaskData:
    # Imported here: sklearn is slow to import and only the zoo build needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # (1797, 8, 8), in [0, 1]
    labels = np.asarray(bunch.target, dtype=np.int64)

    # Split the originals first: no corrupted copy of a held-out digit is ever trained on.
    order = rng.permutation(len(images))
    n_test = round(len(images) * DIGITS_TEST_FRACTION)
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])

    x_train, y_train = _corrupt_digits(images[train_idx], labels[train_idx], size.digits_train_copies, rng)
    x_test, y_test = _corrupt_digits(images[test_idx], labels[test_idx], size.digits_test_copies, rng)
    return TaskData(
        name="digits",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=tuple(str(d) for d in range(10)),
    )


def _corrupt_digits(
    images: FloatArray, labels: IntArray, copies: int, rng: np.random.Generator
) -> tuple[FloatArray, IntArray]:
    clean = np.repeat(images, copies, axis=0)
    y = np.repeat(labels, copies, axis=0)
    n, s = len(clean), DIGITS_CANVAS

    # Defocus: half of the shots get a slight blur.
    blurred = _blur3(clean)
    defocus = rng.random(n) < 0.5
    clean = np.where(defocus[:, None, None], blurred, clean)

    # The digit lands anywhere on the canvas (the camera does not centre it).
    canvas = np.zeros((n, s, s), dtype=np.float32)
    span = s - 8 + 1
    dy = rng.integers(0, span, size=n)
    dx = rng.integers(0, span, size=n)
    for oy in range(span):
        for ox in range(span):
            sel = (dy == oy) & (dx == ox)
            canvas[sel, oy : oy + 8, ox : ox + 8] = clean[sel]

    # Something in front of the digit: a patch of random grey over part of it.
    occluded = rng.random(n) < 0.3
    canvas = _occlude(canvas, occluded, dy, dx, rng)

    return _photograph(canvas, rng, contrast=(0.5, 1.0), noise=(0.02, 0.1)), y


def _blur3(images: FloatArray) -> FloatArray:
    """Separable [1, 6, 1] / 8 blur over the last two axes, edges replicated."""
    k = (0.125, 0.75, 0.125)
    out = images
    for axis in (-2, -1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (1, 1)
        p = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = (
            k[0] * np.take(p, range(0, n), axis=axis)
            + k[1] * np.take(p, range(1, n + 1), axis=axis)
            + k[2] * np.take(p, range(2, n + 2), axis=axis)
        )
    return out.astype(np.float32)


def _occlude(
    canvas: FloatArray,
    active: npt.NDArray[np.bool_],
    dy: npt.NDArray[np.int64],
    dx: npt.NDArray[np.int64],
    rng: np.random.Generator,
) -> FloatArray:
    n, s = len(canvas), canvas.shape[1]
    h = rng.integers(2, 4, size=n)
    w = rng.integers(2, 5, size=n)
    # Anchored inside the digit's 8x8 box, so that the patch really hides strokes.
    y0 = dy + rng.integers(0, 8 - 1, size=n)
    x0 = dx + rng.integers(0, 8 - 1, size=n)
    grey = rng.random(size=n).astype(np.float32)
    rows = np.arange(s)[None, :, None]
    cols = np.arange(s)[None, None, :]
    mask = (
        active[:, None, None]
        & (rows >= y0[:, None, None])
        & (rows < (y0 + h)[:, None, None])
        & (cols >= x0[:, None, None])
        & (cols < (x0 + w)[:, None, None])
    )
    return np.where(mask, grey[:, None, None], canvas).astype(np.float32)


def _photograph(
    scene: FloatArray,
    rng: np.random.Generator,
    contrast: tuple[float, float],
    noise: tuple[float, float],
) -> FloatArray:
    """Low, uneven contrast and sensor noise; returns (N, 1, H, W) clipped to [0, 1]."""
    n, h, w = (int(d) for d in scene.shape)
    c = rng.uniform(contrast[0], contrast[1], size=n).astype(np.float32)
    base = (rng.random(n) * (1.0 - c)).astype(np.float32)
    # A linear illumination gradient across the frame, up to a quarter of the free range.
    angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
    slope = rng.uniform(0.0, 0.25, size=n) * (1.0 - c)
    yy = (np.arange(h, dtype=np.float32) / max(h - 1, 1) - 0.5)[None, :, None]
    xx = (np.arange(w, dtype=np.float32) / max(w - 1, 1) - 0.5)[None, None, :]
    ramp = (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy) * slope[:, None, None]
    sigma = rng.uniform(noise[0], noise[1], size=n).astype(np.float32)
    grain = rng.standard_normal((n, h, w), dtype=np.float32) * sigma[:, None, None]
    img = base[:, None, None] + c[:, None, None] * scene + ramp + grain
    return np.clip(img, 0.0, 1.0).astype(np.float32)[:, None, :, :]


# --- shapes -------------------------------------------------------------------------------------


def _make_shapes(rng: np.random.Generator, size: DataSize) -> TaskData:
    # Train and test are independent draws from the same generator: disjoint in practice
    # (continuous positions, sizes, angles and noise).
    x_train, y_train = _draw_shapes(size.shapes_train, rng)
    x_test, y_test = _draw_shapes(size.shapes_test, rng)
    return TaskData(
        name="shapes",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=SHAPE_CLASSES,
    )


def _draw_shapes(n: int, rng: np.random.Generator) -> tuple[FloatArray, IntArray]:
    s = SHAPES_CANVAS
    y = rng.integers(0, len(SHAPE_CLASSES), size=n).astype(np.int64)
    r = rng.uniform(3.5, 6.5, size=n)
    # Roughly centred, as in a crop around a detected object, but never cut by the border.
    cy = np.clip(s / 2 + rng.uniform(-SHAPES_JITTER, SHAPES_JITTER, size=n), r + 0.5, s - r - 0.5)
    cx = np.clip(s / 2 + rng.uniform(-SHAPES_JITTER, SHAPES_JITTER, size=n), r + 0.5, s - r - 0.5)
    theta = rng.uniform(0.0, 2.0 * np.pi, size=n)
    stroke = rng.uniform(1.0, 1.6, size=n)

    # Pixel centres in each image's own rotated frame: (u, v) relative to the shape's centre.
    grid = np.arange(s, dtype=np.float64) + 0.5
    py = grid[None, :, None] - cy[:, None, None]
    px = grid[None, None, :] - cx[:, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = cos * px + sin * py
    v = -sin * px + cos * py
    rr = r[:, None, None]
    t = stroke[:, None, None] / 2.0

    # Signed distances (negative inside); an anti-aliased shape is clip(0.5 - d, 0, 1).
    radius = np.hypot(u, v)
    box = np.maximum(np.abs(u), np.abs(v))
    tri = np.max(
        [np.cos(a) * u + np.sin(a) * v for a in (np.pi / 2, np.pi * 7 / 6, np.pi * 11 / 6)],
        axis=0,
    )
    arm = 0.55 + 0.25 * t
    cross = np.minimum(
        np.maximum(np.abs(u) - rr, np.abs(v) - arm), np.maximum(np.abs(v) - rr, np.abs(u) - arm)
    )
    ell_a, ell_b = rr * 0.95, rr * 0.45
    ellipse = (np.hypot(u / ell_a, v / ell_b) - 1.0) * ell_b
    sdf = [
        radius - rr * 0.8,  # disk
        np.abs(radius - rr * 0.75) - t,  # ring
        box - rr * 0.7,  # square
        np.abs(box - rr * 0.7) - t,  # frame
        tri - rr * 0.55,  # triangle
        np.abs(tri - rr * 0.55) - t,  # triangle-outline
        cross,
        ellipse,
    ]
    dist = np.choose(y[:, None, None], sdf)
    shape = np.clip(0.5 - dist, 0.0, 1.0)

    scene = np.maximum(shape, _clutter(n, rng))
    return _photograph(scene.astype(np.float32), rng, contrast=(0.35, 1.0), noise=(0.04, 0.22)), y


def _clutter(n: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Up to three short, faint strokes anywhere in the frame: things that are not the shape."""
    s = SHAPES_CANVAS
    grid = np.arange(s, dtype=np.float64) + 0.5
    py, px = grid[None, :, None], grid[None, None, :]
    out = np.zeros((n, s, s))
    count = rng.integers(0, 4, size=n)
    for k in range(3):
        ay, ax = rng.uniform(0, s, size=n), rng.uniform(0, s, size=n)
        length = rng.uniform(2.0, 5.0, size=n)
        angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
        by, bx = ay + length * np.sin(angle), ax + length * np.cos(angle)
        d = _segment_distance(py, px, ay, ax, by, bx)
        level = rng.uniform(0.3, 0.8, size=n) * (k < count)
        out = np.maximum(out, np.clip(1.0 - d, 0.0, 1.0) * level[:, None, None])
    return out


def _segment_distance(
    py: npt.NDArray[np.float64],
    px: npt.NDArray[np.float64],
    ay: npt.NDArray[np.float64],
    ax: npt.NDArray[np.float64],
    by: npt.NDArray[np.float64],
    bx: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    ay, ax, by, bx = (a[:, None, None] for a in (ay, ax, by, bx))
    ey, ex = by - ay, bx - ax
    h = np.clip(((py - ay) * ey + (px - ax) * ex) / (ey * ey + ex * ex), 0.0, 1.0)
    return np.hypot(py - ay - h * ey, px - ax - h * ex)


def sample_indices(data: TaskData, count: int, seed: int) -> IntArray:
    """Which held-out samples ``sample_split`` publishes (sorted indices into ``x_test``)."""
    rng = np.random.default_rng([seed, TASKS.index(data.name), 1])
    return np.sort(rng.choice(len(data.x_test), size=min(count, len(data.x_test)), replace=False))


def sample_split(data: TaskData, count: int, seed: int) -> tuple[FloatArray, IntArray]:
    """A seeded subset of the held-out split: the inputs clients send in tests and load runs."""
    idx = sample_indices(data, count, seed)
    return data.x_test[idx].copy(), data.y_test[idx].copy()
