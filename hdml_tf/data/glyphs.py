"""The embedded default data set: characters rendered from the fonts that ship with matplotlib.

Runs offline on a fresh machine (matplotlib is a dependency) and, unlike scikit-learn's digits, is not solved by raw
pixels, so a short training run has something to show (issue 2, section 3).

* **Fonts** (`FONT_FILES`): 16 files of matplotlib's `mpl-data/fonts/ttf`: DejaVu Sans, DejaVu Serif, DejaVu Sans
  Mono and STIX General, each in regular, bold, italic/oblique and bold-italic/bold-oblique. Each covers every
  candidate character (the "Display" and STIX "NonUni"/"Siz*" files cover none of them, the Computer Modern files
  no Greek or Cyrillic).
* **Classes** (`CLASSES`, 133): one per character of Latin, Greek and Cyrillic upper and lower case and the digits
  (`CANDIDATES`, 176), minus the 43 look-alikes of `LOOKALIKES`, so that no two classes render alike in any font
  (`glyph_confusable_pairs` is the criterion, and it returns nothing for `CLASSES`). A look-alike is dropped, not
  merged into the class it copies: where two outlines coincide in every font a merge only duplicates images, and
  where they coincide in some fonts only (Cyrillic italic и = u, п = n, т = m in DejaVu Serif Italic) it would give
  one class two unrelated shapes.
* **Case pairs that differ mainly in size** (c/C, o/O, s/S, v/V, w/W, x/X, z/Z, the Cyrillic small capitals в/В,
  н/Н, ж/Ж, я/Я, ...) stay separate classes, because the rendering keeps size: every font is drawn at one scale
  with all glyphs on one baseline, so lower case keeps its x-height and upper case its cap height. Every case pair
  whose shapes come within 0.1 of each other once size is removed (the measure of `glyph_confusable_pairs`; closest
  Ж/ж 0.056 and Я/я 0.057, then Z/z, S/s, W/w, O/o, ...) has the capital at least 1.24 times larger, while two
  renderings of one glyph differ in size by at most `DISTORTION.max_size_ratio` = 1.075 / 0.93 = 1.16.
* **Renderings**: each character's outline is read once per font (`matplotlib.textpath`) and placed by the font's
  layout; each of its `renderings_per_font` renderings per font rasterizes that outline through a seeded random
  affine map (`DISTORTION`: rotation, shear, isotropic scale, shift) with matplotlib's Agg renderer. Because the map
  is applied to the vector outline, nothing is resampled: each image has exact antialiasing. Dark glyph (0) on a
  white background (255), grey repeated to RGB uint8.
* **Split** by class (zero-shot): within each script group of `SCRIPT_GROUPS` the characters are permuted with
  `seed` and the first half goes to train; the odd character of an odd-sized group goes to whichever split has
  fewer classes so far (train on ties). 67 train and 66 test classes, each with 16 * `renderings_per_font` images.

Raw pixels (L2-normalized, leave-one-out nearest neighbour on the test split; image_size 64, 4 renderings per font,
seed 0) reach Recall@1 0.39: far from solved, yet every class has a shape of its own to learn.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from hdml_tf.errors import ConfigError
from hdml_tf.data.image_set import ImageSet
from hdml_tf.errors import DataError

logger = logging.getLogger(__name__)

FONT_FILES: Tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)


def _span(first: str, last: str, skip: str = "") -> str:
    return "".join(chr(c) for c in range(ord(first), ord(last) + 1) if chr(c) not in skip)


# Script groups, in class order. Greek final sigma (ς) is a positional form of σ and is left out; Cyrillic is the
# 33-letter Russian alphabet (Ё/ё included).
SCRIPT_GROUPS: Dict[str, str] = {
    "latin_upper": _span("A", "Z"),
    "latin_lower": _span("a", "z"),
    "greek_upper": _span("Α", "Ω", skip="\u03a2"),
    "greek_lower": _span("α", "ω", skip="ς"),
    "cyrillic_upper": _span("А", "Я") + "Ё",
    "cyrillic_lower": _span("а", "я") + "ё",
    "digits": _span("0", "9"),
}
CANDIDATES: str = "".join(SCRIPT_GROUPS.values())

# Dropped character -> the kept class it renders like. `glyph_confusable_pairs` flags every entry when it is put back
# (tests/test_glyphs.py checks it); the numbers in parentheses are its distances (threshold 0.05).
LOOKALIKES: Dict[str, str] = {
    # Greek and Cyrillic capitals that share the Latin outline in every font (0.00).
    "Α": "A", "А": "A", "Β": "B", "В": "B", "С": "C", "Ε": "E", "Е": "E", "Ζ": "Z", "Η": "H", "Н": "H",
    "Ι": "I", "Κ": "K", "К": "K", "Μ": "M", "М": "M", "Ν": "N", "Ο": "O", "О": "O", "Ρ": "P", "Р": "P",
    "Τ": "T", "Т": "T", "Υ": "Y", "Χ": "X", "Х": "X",
    # Cyrillic capitals that share the Greek outline (0.00; Ф/Φ 0.003 in STIX General).
    "Г": "Γ", "П": "Π", "Ф": "Φ",
    # Cyrillic Ze is the digit three in DejaVu Sans Mono Bold (0.00); the digits are kept whole.
    "З": "3",
    # Lower case sharing the Latin outline in every font (0.00).
    "а": "a", "с": "c", "е": "e", "ο": "o", "о": "o", "р": "p", "х": "x", "у": "y",
    # Cyrillic ka is Greek kappa in DejaVu Sans Mono and DejaVu Serif (0.00).
    "к": "κ",
    # Cyrillic italic forms: и = u, т = m (DejaVu Serif Italic, 0.00); п = n there and = π in DejaVu Serif Bold.
    "и": "u", "т": "m", "п": "n",
    # Sans-serif ell is the capital I, 4 % taller and 9 % lighter (DejaVu Sans 0.014).
    "l": "I",
    # Cyrillic capital U is the shape of Latin y, standing on the baseline instead of hanging below it (0.039,
    # DejaVu Sans Mono).
    "У": "y",
}
CLASSES: str = "".join(c for c in CANDIDATES if c not in LOOKALIKES)

# Layout: every font is drawn at one scale chosen so that the union of its candidates' outlines (accents of Ё/Й,
# descenders, the widest letter) fits the box with this margin on each side.
MARGIN = 0.15


@dataclasses.dataclass(frozen=True)
class Distortion:
    """Ranges of the seeded random affine map applied to each rendering (uniform draws).

    Attributes:
      rotation_deg: rotation angle in [-rotation_deg, rotation_deg] degrees.
      shear: horizontal shear factor in [-shear, shear] (x' = x + shear * y).
      scale: isotropic scale, log-uniform in [scale[0], scale[1]]. Two renderings of a glyph differ in size by at
        most scale[1] / scale[0] = 1.16, less than the 1.24 by which upper case at least exceeds lower case in
        the case pairs whose shapes are alike (see the module docstring).
      shift: translation of each axis in [-shift, shift], as a fraction of the image side.
    """

    rotation_deg: float = 12.0
    shear: float = 0.2
    scale: Tuple[float, float] = (0.93, 1.075)
    shift: float = 0.15

    @property
    def max_size_ratio(self) -> float:
        """Largest size ratio between two renderings of one glyph."""
        return self.scale[1] / self.scale[0]


DISTORTION = Distortion()

# `glyph_confusable_pairs`. Side of the normalized renderings, the share of it the glyph's longer side fills, and
# the blur (pixels) that turns stroke weight into brightness.
_NORMALIZED_SIZE = 32
_NORMALIZED_FILL = 0.8
_SHAPE_BLUR = 2.0
# Measured at these settings: outlines that coincide <= 0.004; sans-serif l against I 0.014; y against Cyrillic У
# (one shape at two heights on the line) 0.039. The closest pairs of `CLASSES`: Θ/0 0.071 (DejaVu Sans Mono Bold
# Oblique, where a dash and a dot inside the oval tell them apart), θ/0 0.072 (STIX General Bold), H/И 0.096; with
# the size condition dropped also Ж/ж 0.056, Я/я 0.057.
CONFUSABLE_THRESHOLD = 0.05

# Bump when the rendering changes, so that stale cache files are not reused.
_RENDER_VERSION = 1

ConfusablePair = collections.namedtuple("ConfusablePair", ["first", "second", "font", "distance"])
ConfusablePair.__doc__ = ("Two characters whose renderings in `font` are `distance` apart "
                          "(see `glyph_confusable_pairs`).")


def glyph_fonts() -> List[str]:
    """Absolute paths of `FONT_FILES` in matplotlib's `mpl-data/fonts/ttf`.

    Raises:
      DataError: a font file is missing (a broken matplotlib installation).
    """
    import matplotlib  # pylint: disable=import-outside-toplevel

    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    paths = [os.path.join(folder, name) for name in FONT_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"matplotlib's bundled font {missing[0]} is missing ({len(missing)} of {len(paths)} "
                        f"glyph fonts); reinstall matplotlib")
    return paths


@functools.lru_cache(maxsize=None)
def _outlines(font_path: str) -> Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Outline of every candidate in one font: char -> (vertices [K, 2], codes [K], bbox [x0, y0, x1, y1]).

    Font units, baseline at y = 0, y up. The bbox is that of the on-curve and control points (TrueType fonts place
    points at the extrema, so it is the outline's box); the (0, 0) vertices of CLOSEPOLY codes are ignored.
    """
    from matplotlib.font_manager import FontProperties  # pylint: disable=import-outside-toplevel
    from matplotlib.path import Path  # pylint: disable=import-outside-toplevel
    from matplotlib.textpath import text_to_path  # pylint: disable=import-outside-toplevel

    prop = FontProperties(fname=font_path)
    out = {}
    for char in CANDIDATES:
        vertices, codes = text_to_path.get_text_path(prop, char)
        vertices = np.asarray(vertices, np.float64)
        codes = np.asarray(codes, np.uint8)
        points = vertices[codes != Path.CLOSEPOLY]
        if not len(points):
            raise DataError(f"font {os.path.basename(font_path)} has no outline for {char!r} "
                            f"(U+{ord(char):04X})")
        out[char] = (vertices, codes, np.concatenate([points.min(0), points.max(0)]))
    return out


def _rasterize(font_path: str, chars: Sequence[str], matrices: np.ndarray, size: int) -> np.ndarray:
    """Fills the outlines of `chars` in one font, uint8 [C, size, size] ink coverage 0..255.

    matplotlib's Agg rasterizer, antialiased (exact area coverage), no pixel snapping; glyphs are drawn into cells
    of an atlas of at most 2^22 pixels at a time. matrices [C, 3, 3] map font units (baseline y = 0, y up) to pixels
    relative to the cell centre (y up).
    """
    from matplotlib.backends.backend_agg import RendererAgg  # pylint: disable=import-outside-toplevel
    from matplotlib.path import Path  # pylint: disable=import-outside-toplevel
    from matplotlib.transforms import Affine2D, Bbox  # pylint: disable=import-outside-toplevel

    outlines = _outlines(font_path)
    paths = {c: Path(*outlines[c][:2]) for c in set(chars)}
    out = np.empty((len(chars), size, size), np.uint8)
    per_atlas = max(1, (1 << 22) // (size * size))
    for start in range(0, len(chars), per_atlas):
        count = min(per_atlas, len(chars) - start)
        cols = int(np.ceil(np.sqrt(count)))
        rows = int(np.ceil(count / cols))
        renderer = RendererAgg(cols * size, rows * size, 72)
        gc = renderer.new_gc()
        gc.set_antialiased(True)
        gc.set_linewidth(0)
        gc.set_snap(False)
        for k in range(count):
            row, col = divmod(k, cols)  # Agg's y axis points up: cell row 0 is at the top of the buffer
            x0, y0 = col * size, (rows - 1 - row) * size
            gc.set_clip_rectangle(Bbox.from_bounds(x0, y0, size, size))  # a distorted glyph may overflow its cell
            transform = Affine2D(matrices[start + k]).translate(x0 + size / 2, y0 + size / 2)
            renderer.draw_path(gc, paths[chars[start + k]], transform, (0.0, 0.0, 0.0, 1.0))
        gc.restore()
        alpha = np.asarray(renderer.buffer_rgba())[..., 3]
        cells = alpha.reshape(rows, size, cols, size).transpose(0, 2, 1, 3).reshape(rows * cols, size, size)
        out[start:start + count] = cells[:count]
    return out


def _placement(scale, x, y) -> np.ndarray:
    """Matrices [C, 3, 3] mapping font units to cell-centred pixels: (u, v) -> ((u - x) * scale, (v - y) * scale)."""
    scale, x, y = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (scale, x, y)))
    matrices = np.zeros(scale.shape + (3, 3))
    matrices[..., 0, 0] = matrices[..., 1, 1] = scale
    matrices[..., 0, 2], matrices[..., 1, 2] = -x * scale, -y * scale
    matrices[..., 2, 2] = 1.0
    return matrices


def _layout(font_path: str, chars: Sequence[str], size: int) -> np.ndarray:
    """The data set's layout in one font, matrices [C, 3, 3] (see `_rasterize`).

    One scale and one baseline for every character of the font, fitted so that the union of all `CANDIDATES`'
    boxes fits the square with `MARGIN` (so a glyph's placement does not depend on `chars`); each glyph centred
    horizontally on its own box. Lower case thus keeps its x-height and upper case its cap height.
    """
    outlines = _outlines(font_path)
    boxes = np.stack([box for _, _, box in outlines.values()])
    top, bottom = boxes[:, 3].max(), boxes[:, 1].min()
    scale = (1 - 2 * MARGIN) * size / max(top - bottom, (boxes[:, 2] - boxes[:, 0]).max())
    centres = np.array([(outlines[c][2][0] + outlines[c][2][2]) / 2 for c in chars])
    return _placement(scale, centres, (top + bottom) / 2)


def render_glyphs(image_size: int = 64, chars: Sequence[str] = CLASSES) -> np.ndarray:
    """Undistorted renderings in the data set's layout: float32 ink coverage in [0, 1], [F, C, S, S].

    F = len(FONT_FILES) in that order, C = len(chars), S = image_size. `load_glyphs`'s images are
    255 - 255 * coverage of these under the identity distortion.
    """
    _check_size(image_size)
    return np.stack([_rasterize(path, chars, _layout(path, chars, image_size), image_size)
                     for path in glyph_fonts()]).astype(np.float32) / 255.0


def normalized_glyphs(chars: Sequence[str] = CLASSES) -> Tuple[np.ndarray, np.ndarray]:
    """Renderings with position and size removed, as compared by `glyph_confusable_pairs`.

    Each glyph's outline box is centred in a `_NORMALIZED_SIZE` square and its longer side scaled to
    `_NORMALIZED_FILL` of it.

    Returns:
      images: float32 ink coverage in [0, 1], [F, C, N, N] (N = _NORMALIZED_SIZE).
      sizes: float64 [F, C], the longer side of each outline box in font units (its size before normalizing).
    """
    images, sizes = [], []
    for path in glyph_fonts():
        boxes = np.stack([_outlines(path)[c][2] for c in chars])
        longer = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        matrices = _placement(_NORMALIZED_FILL * _NORMALIZED_SIZE / longer, (boxes[:, 0] + boxes[:, 2]) / 2,
                              (boxes[:, 1] + boxes[:, 3]) / 2)
        images.append(_rasterize(path, chars, matrices, _NORMALIZED_SIZE))
        sizes.append(longer)
    return np.stack(images).astype(np.float32) / 255.0, np.stack(sizes)


def glyph_confusable_pairs(chars: Sequence[str] = CLASSES,
                           threshold: float = CONFUSABLE_THRESHOLD) -> List[ConfusablePair]:
    """Pairs of characters that render alike in at least one font; empty for `CLASSES`.

    Criterion. Two characters render alike when, in one font of `FONT_FILES`, nothing but what varies inside every
    class tells them apart. Inside a class vary: the position (the distortion shifts; a convolutional embedding is
    close to translation invariant), the size up to `DISTORTION.max_size_ratio`, and the stroke weight (regular
    and bold fonts). So, for characters a and b in font f:

    1. sizes (longer side of the outline box) differing by more than `DISTORTION.max_size_ratio` (1.16) tell
       them apart (c/C, o/O, в/В, ...: see the module docstring);
    2. otherwise each is drawn with its box centred and its longer side at `_NORMALIZED_FILL` of a
       `_NORMALIZED_SIZE` px square (`normalized_glyphs`), blurred by a Gaussian of `_SHAPE_BLUR` px (8 % of the
       glyph), and the two images x_a, x_b compared by the cosine distance

           d(a, b) = || x_a / ||x_a|| - x_b / ||x_b|| ||_2      (0: same shape, sqrt(2): disjoint).

       The blur is wider than the strokes, so a heavier stroke mostly brightens the blurred image, which the
       normalization removes; what remains is the layout of the strokes;
    3. they are confusable if d(a, b) < threshold.

    Comparing inside one font is the point: a class may look different across fonts, but in each font it must have
    a shape of its own. Rotation and shear are not normalized: both glyphs of a pair are drawn in the same font,
    hence with the same slant. The threshold lies in the gap of the measured distances (`CONFUSABLE_THRESHOLD`).

    Args:
      chars: characters to compare pairwise (default: the classes of the data set).
      threshold: distance under which a pair is confusable.

    Returns:
      One `ConfusablePair(first, second, font, distance)` per confusable pair (first before second in `chars`),
      with the font file where the two are closest, sorted by distance.
    """
    from scipy import ndimage  # pylint: disable=import-outside-toplevel

    images, sizes = normalized_glyphs(chars)
    blurred = ndimage.gaussian_filter(images, (0, 0, _SHAPE_BLUR, _SHAPE_BLUR), mode="constant")
    flat = blurred.reshape(blurred.shape[0], blurred.shape[1], -1).astype(np.float64)
    flat /= np.linalg.norm(flat, axis=-1, keepdims=True)
    dist = np.sqrt(np.maximum(2.0 - 2.0 * np.einsum("fid,fjd->fij", flat, flat), 0.0))  # [F, C, C]
    ratio = sizes[:, :, None] / sizes[:, None, :]
    dist[np.maximum(ratio, 1 / ratio) > DISTORTION.max_size_ratio] = np.inf
    closest, font = dist.min(0), dist.argmin(0)
    first, second = np.nonzero(np.triu(closest < threshold, k=1))
    pairs = [ConfusablePair(chars[i], chars[j], FONT_FILES[font[i, j]], float(closest[i, j]))
             for i, j in zip(first, second)]
    return sorted(pairs, key=lambda p: p.distance)


def _check_size(image_size) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 16:
        raise ConfigError(f"image_size={image_size!r} must be an integer >= 16")


def split_classes(seed: int = 0) -> Tuple[str, str]:
    """The zero-shot class split of `load_glyphs`: (train characters, test characters), each in `CLASSES` order.

    Within each group of `SCRIPT_GROUPS` (look-alikes removed) the characters are permuted by a generator seeded
    with `seed`; the first half goes to train. The odd character of an odd-sized group goes to the split with fewer
    classes so far (train on a tie), so both splits have every script and sizes differ by at most one.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
    train = set()
    n_train = n_test = 0
    for group in SCRIPT_GROUPS.values():
        members = [c for c in group if c not in LOOKALIKES]
        order = rng.permutation(len(members))
        k = len(members) // 2 + (len(members) % 2 if n_train <= n_test else 0)
        train.update(members[i] for i in order[:k])
        n_train, n_test = n_train + k, n_test + len(members) - k
    return ("".join(c for c in CLASSES if c in train), "".join(c for c in CLASSES if c not in train))


def _sample_distortions(rng: np.random.Generator, count: int, image_size: int,
                        distortion: Distortion) -> np.ndarray:
    """`count` random affine maps of the image plane about its centre, [count, 3, 3] in pixels (y up).

    p -> rotation @ shear @ (scale * p) + shift.
    """
    angle = np.deg2rad(rng.uniform(-distortion.rotation_deg, distortion.rotation_deg, count))
    shear = rng.uniform(-distortion.shear, distortion.shear, count)
    scale = np.exp(rng.uniform(np.log(distortion.scale[0]), np.log(distortion.scale[1]), count))
    shift = rng.uniform(-distortion.shift, distortion.shift, (count, 2)) * image_size
    cos, sin = np.cos(angle), np.sin(angle)
    maps = np.zeros((count, 3, 3))
    # [[cos, -sin], [sin, cos]] @ [[1, shear], [0, 1]] * scale
    maps[:, 0, 0], maps[:, 0, 1] = cos * scale, (cos * shear - sin) * scale
    maps[:, 1, 0], maps[:, 1, 1] = sin * scale, (sin * shear + cos) * scale
    maps[:, :2, 2] = shift
    maps[:, 2, 2] = 1.0
    return maps


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hdml_tf")


def _cache_file(cache_dir: str, image_size: int, renderings_per_font: int, seed: int) -> str:
    import matplotlib  # pylint: disable=import-outside-toplevel

    key = json.dumps({
        "version": _RENDER_VERSION, "image_size": image_size, "renderings_per_font": renderings_per_font,
        "seed": seed, "fonts": [(name, os.path.getsize(path)) for name, path in zip(FONT_FILES, glyph_fonts())],
        "classes": CLASSES, "margin": MARGIN, "distortion": dataclasses.asdict(DISTORTION),
        "matplotlib": matplotlib.__version__, "numpy": np.__version__,
    }, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache_dir, f"glyphs_s{image_size}_r{renderings_per_font}_seed{seed}_{digest}.npz")


def _render_set(image_size: int, renderings_per_font: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """All classes' distorted renderings, uint8 [C, F, R, S, S] (255 background), and the train mask [C].

    Each rendering rasterizes the glyph's outline through (distortion @ layout): the affine map is applied to the
    vector outline, so there is no resampling and the antialiasing stays exact.
    """
    n_classes, n_fonts, n_rend = len(CLASSES), len(FONT_FILES), renderings_per_font
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    maps = _sample_distortions(rng, n_classes * n_fonts * n_rend, image_size, DISTORTION)
    maps = maps.reshape(n_classes, n_fonts, n_rend, 3, 3)
    images = np.empty((n_classes, n_fonts, n_rend, image_size, image_size), np.uint8)
    chars = [c for c in CLASSES for _ in range(n_rend)]  # class-major, rendering fastest
    for f, path in enumerate(glyph_fonts()):
        layout = np.repeat(_layout(path, CLASSES, image_size), n_rend, axis=0)  # [C*R, 3, 3]
        matrices = maps[:, f].reshape(-1, 3, 3) @ layout
        coverage = _rasterize(path, chars, matrices, image_size)
        images[:, f] = (255 - coverage).reshape(n_classes, n_rend, image_size, image_size)
    train_chars = split_classes(seed)[0]
    return images, np.array([c in train_chars for c in CLASSES])


def load_glyphs(image_size: int = 64, renderings_per_font: int = 4, seed: int = 0,
                cache_dir: Optional[str] = None) -> Tuple[ImageSet, ImageSet]:
    """The embedded default data set: (train, test) with disjoint classes (see the module docstring).

    Args:
      image_size: side S of the square images (>= 16).
      renderings_per_font: distorted renderings of each character in each of the 16 fonts; a class has
        16 * renderings_per_font images.
      seed: seeds the class split (`split_classes`) and the distortions; equal arguments give equal images.
      cache_dir: folder of the rendered-set cache (`.npz` named by a hash of every parameter, the fonts and the
        library versions); default `$XDG_CACHE_HOME/hdml_tf`, i.e. `~/.cache/hdml_tf`. An unreadable cache file is
        rendered again; an unwritable folder only costs the caching.

    Returns:
      train, test: `ImageSet`s named "glyphs/train" and "glyphs/test" with uint8 images [N, S, S, 3] (dark glyph on
      white), labels 0..C-1 in `CLASSES` order, `class_names` the characters and `original_class_ids` their code
      points. Images are grouped by class, then font (`FONT_FILES` order), then rendering.

    Raises:
      ConfigError: a bad image_size, renderings_per_font or seed.
      DataError: matplotlib's fonts are missing.
    """
    _check_size(image_size)
    if (isinstance(renderings_per_font, bool) or not isinstance(renderings_per_font, (int, np.integer))
            or renderings_per_font < 1):
        raise ConfigError(f"renderings_per_font={renderings_per_font!r} must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be an integer >= 0")
    image_size, renderings_per_font, seed = int(image_size), int(renderings_per_font), int(seed)
    path = _cache_file(cache_dir or _default_cache_dir(), image_size, renderings_per_font, seed)
    images = train_mask = None
    if os.path.exists(path):
        try:
            with np.load(path) as cached:
                images, train_mask = cached["images"], cached["train"]
            expected = (len(CLASSES), len(FONT_FILES), renderings_per_font, image_size, image_size)
            if images.shape != expected or images.dtype != np.uint8 or train_mask.shape != (len(CLASSES),):
                raise ValueError(f"images {images.dtype} {images.shape}, train mask {train_mask.shape}")
            train_mask = train_mask.astype(bool)
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
            logger.warning("glyphs: ignoring unreadable cache %s (%s)", path, err)
            images = None
    if images is None:
        start = time.perf_counter()
        images, train_mask = _render_set(image_size, renderings_per_font, seed)
        logger.info("glyphs: rendered %d images in %.1f s", images[..., 0, 0].size, time.perf_counter() - start)
        _save(path, images=images, train=train_mask)
    return (_image_set(images, train_mask, "glyphs/train"), _image_set(images, ~train_mask, "glyphs/test"))


def _save(path: str, **arrays) -> None:
    """Writes the cache atomically (temporary file, then rename); failures only log."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        logger.warning("glyphs: could not write cache %s (%s)", path, err)


def _image_set(images: np.ndarray, mask: np.ndarray, name: str) -> ImageSet:
    chars = [c for c, keep in zip(CLASSES, mask) if keep]
    per_class = images.shape[1] * images.shape[2]
    gray = images[mask].reshape(-1, *images.shape[-2:])
    return ImageSet(labels=np.repeat(np.arange(len(chars)), per_class), class_names=chars,
                    images=np.repeat(gray[..., None], 3, axis=-1), name=name,
                    original_class_ids=[ord(c) for c in chars])
