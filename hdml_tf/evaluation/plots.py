"""Figures as PNG files: a t-SNE map of embeddings, a retrieval grid, and training curves.

Rendering uses matplotlib's Agg canvas directly (`matplotlib.figure.Figure` + `FigureCanvasAgg`), so importing this
module never changes the global pyplot backend and works without a display.
"""
from __future__ import annotations

import csv
import math
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# Per-step quantities logged by HDMLModel (docs/ARCHITECTURE.md), in panel order.
TRAINING_CURVE_KEYS = ("loss", "j_m", "j_syn", "j_gen", "j_recon", "j_soft", "j_ce", "j_avg", "j_gen_avg",
                       "pull_factor", "syn_weight", "pulled_fraction")
_TITLES = {
    "loss": "J_metric (loss)", "j_m": "J_m (metric loss)", "j_syn": "J_syn (synthetic)", "j_gen": "J_gen",
    "j_recon": "J_recon", "j_soft": "J_soft", "j_ce": "J_ce (classifier)", "j_avg": "J_avg (running mean)",
    "j_gen_avg": "J_gen running mean", "pull_factor": "pull factor e^(-alpha/J_avg)",
    "syn_weight": "synthetic weight 1-e^(-beta/J_gen)", "pulled_fraction": "fraction of pulled negatives",
}
_FRACTIONS = ("pull_factor", "syn_weight", "pulled_fraction")  # in [0, 1]: always a linear axis
_GREEN, _RED, _BLUE = "#1a9850", "#d73027", "#2166ac"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str, dpi: int = 100) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", bbox_inches="tight")
    return path


def _class_colors(num_classes: int, seed: int = 0) -> np.ndarray:
    """[C, 4] RGBA colours: tab10/tab20 for few classes, else a shuffled spectral ramp (neighbouring ids differ)."""
    import matplotlib

    if num_classes <= 10:
        return matplotlib.colormaps["tab10"](np.arange(num_classes))
    if num_classes <= 20:
        return matplotlib.colormaps["tab20"](np.arange(num_classes))
    ramp = matplotlib.colormaps["nipy_spectral"](np.linspace(0.05, 0.95, num_classes))
    return ramp[np.random.default_rng(seed).permutation(num_classes)]


def _display(image) -> np.ndarray:
    """An image as float [H, W, 3] in 0..1 for imshow: uint8 0..255, float 0..255 or float 0..1."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be [H, W, 3], got shape {img.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    img = img[..., :3].astype(np.float32)
    if np.issubdtype(np.asarray(image).dtype, np.integer) or img.max(initial=0.0) > 1.5:
        img = img / 255.0
    return np.clip(img, 0.0, 1.0)


def _thumbnail(image, size: int) -> np.ndarray:
    img = _display(image)
    step = max(1, int(math.ceil(max(img.shape[:2]) / size)))
    return img[::step, ::step]


# ------------------------------------------------------------------------------------------------------ t-SNE

def plot_tsne(embeddings, labels, path: str, *, images=None, max_points: int = 3000, perplexity: float = 30.0,
              seed: int = 0, max_thumbnails: int = 150, max_iter: int = 1000,
              title: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """A t-SNE map (scikit-learn TSNE) of embeddings coloured by class, like the paper's Figure 6 (Cars196 test).

    Args:
      embeddings: float [N, E].
      labels: int [N].
      path: PNG file to write.
      images: optional [N, H, W, 3] images (or a sequence, or a callable i -> image); then thumbnails of up to
        `max_thumbnails` spread-out points are drawn with a frame in their class colour.
      max_points: a seeded random subset of this many points is mapped (t-SNE is O(N log N) but slow on CPU:
        ~ 1 min for 3,000 points on 2 cores).
      perplexity: t-SNE perplexity, capped below the number of points.
      seed: subset, t-SNE and colour seed.
      max_iter: t-SNE optimization steps (scikit-learn's default 1000; at least 250).
      title: figure title.
    Returns:
      (indices [n] of the mapped points, coordinates [n, 2]).
    Raises:
      ValueError: mismatched lengths or fewer than 3 points.
    """
    from sklearn.manifold import TSNE

    x = np.asarray(embeddings, dtype=np.float32)
    y = np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"plot_tsne needs embeddings [N, E] and labels [N], got {x.shape} and {y.shape}")
    if len(x) < 3:
        raise ValueError(f"plot_tsne needs at least 3 points, got {len(x)}")
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(x), size=min(max_points, len(x)), replace=False))
    perplexity = float(min(perplexity, (len(index) - 1) / 3.0))
    # Barnes-Hut (O(n log n)) for real maps; the exact method is faster below ~500 points.
    coords = TSNE(n_components=2, perplexity=max(perplexity, 1.0), init="pca", random_state=seed,
                  max_iter=max(250, int(max_iter)), method="exact" if len(index) <= 500 else "barnes_hut",
                  ).fit_transform(x[index])
    classes, cls = np.unique(y[index], return_inverse=True)
    colors = _class_colors(len(classes), seed)

    fig = _figure(10, 10)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(coords[:, 0], coords[:, 1], c=colors[cls], s=8 if images is None else 4, linewidths=0)
    if images is not None:
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage

        get = images if callable(images) else (lambda i: images[i])
        for j in _spread_out(coords, max_thumbnails):
            box = AnnotationBbox(OffsetImage(_thumbnail(get(int(index[j])), 40), zoom=1.0), coords[j], frameon=True,
                                 pad=0.1, bboxprops=dict(edgecolor=colors[cls[j]], linewidth=1.5))
            ax.add_artist(box)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(index)} embeddings, {len(classes)} classes")
    _save(fig, path)
    return index, coords


def _spread_out(coords: np.ndarray, count: int) -> np.ndarray:
    """Up to `count` point indices, at most one per cell of a sqrt(count) x sqrt(count) grid over the map."""
    side = max(1, int(math.sqrt(count)))
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    cell = np.floor((coords - lo) / np.maximum(hi - lo, 1e-9) * (side - 1e-6)).astype(np.int64)
    _, first = np.unique(cell[:, 0] * side + cell[:, 1], return_index=True)
    return np.sort(first)[:count]


# --------------------------------------------------------------------------------------------- retrieval grid

#: Retrieval grid geometry: side of one image cell (inches), caption font size (points), caption lines per cell.
GRID_CELL_INCHES = 1.5
GRID_FONT_SIZE = 8
GRID_CAPTION_LINES = 2
_BREAKS = re.compile(r"(?<=[ _./-])")  # a name may wrap after a space, an underscore, a dot, a slash or a dash


def caption_lines(text: str, chars: int, lines: int = GRID_CAPTION_LINES) -> List[str]:
    """`text` wrapped into at most `lines` lines of at most `chars` characters, the last one ending with "..." when
    the rest does not fit: "001.Black_footed_Albatross" -> ["001.Black_footed_", "Albatross"] for chars=20.

    Breaks after spaces, underscores, dots, slashes and dashes (class names like CUB's folder names have no
    spaces), inside a word only when the word alone is too long.
    """
    pieces = [p for p in _BREAKS.split(str(text)) if p]
    out: List[str] = []
    current = ""
    for piece in pieces:
        while len(piece) > chars:  # a word longer than a line: cut it
            if current:
                out.append(current)
                current = ""
            out.append(piece[:chars])
            piece = piece[chars:]
        if len(current) + len(piece) > chars:
            out.append(current)
            current = ""
        current += piece
    if current:
        out.append(current)
    out = [line.rstrip() if line.endswith(" ") else line for line in out] or [""]
    if len(out) > lines:
        last = out[lines - 1]
        out = out[:lines - 1] + [last[:max(0, chars - 3)].rstrip() + "..."]
    return out


def _chars_per_line(width_inches: float, font_size: float) -> int:
    """Characters of a caption that fit a cell: DejaVu Sans averages about 0.6 em per character."""
    return max(4, int(width_inches * 72 / (font_size * 0.6)))


def plot_image_grid(rows: Sequence[Sequence[Tuple[object, str, Optional[str]]]], path: str, *,
                    title: Optional[str] = None, cell: float = GRID_CELL_INCHES,
                    font_size: float = GRID_FONT_SIZE) -> str:
    """Rows of images, each with a caption under it and an optional coloured frame.

    The figure's size follows its content: every image is `cell` inches wide, a row as tall as its tallest image
    (landscape photos make shorter rows, so no empty band opens above or below them), plus the caption lines the
    row needs (names are wrapped and shortened to fit their cell, `caption_lines`); the title sits right above the
    first row.

    Args:
      rows: per row, (image, caption, frame colour or None) for each cell; images as `_display` takes them.
      path: PNG file to write.
      title: figure title.
    Returns:
      path.
    """
    cols = max(len(row) for row in rows)
    chars = _chars_per_line(cell, font_size)
    pictures = [[_display(image) for image, _, _ in row] for row in rows]
    captions = [[caption_lines(text, chars) for _, text, _ in row] for row in rows]
    line_inches, gap = font_size * 1.3 / 72, 0.1
    # Row height: the tallest image at `cell` wide (aspect capped so one odd image cannot stretch a row).
    heights = [cell * min(1.5, max(0.5, max(p.shape[0] / p.shape[1] for p in row))) for row in pictures]
    caption_inches = [max(len(c) for c in row) * line_inches + 0.06 for row in captions]
    title_inches = font_size * 1.6 / 72 + gap if title else 0.0
    width = cols * (cell + gap)
    height = title_inches + sum(heights) + sum(caption_inches) + gap * (len(rows) - 1)
    fig = _figure(width, height)
    top = 1.0 - title_inches / height
    for i, row in enumerate(rows):
        for j, (_, _, color) in enumerate(row):
            left = (j * (cell + gap) + gap / 2) / width
            ax = fig.add_axes((left, top - heights[i] / height, cell / width, heights[i] / height))
            ax.imshow(pictures[i][j])
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(color is not None)
                if color is not None:
                    spine.set_edgecolor(color)
                    spine.set_linewidth(4)
            fig.text(left + cell / width / 2, top - (heights[i] + 0.04) / height, "\n".join(captions[i][j]),
                     ha="center", va="top", fontsize=font_size, linespacing=1.1)
        top -= (heights[i] + caption_inches[i] + gap) / height
    if title:
        fig.text(0.5, 1.0, title, ha="center", va="top", fontsize=font_size + 3)
    return _save(fig, path)


def plot_retrieval_grid(query_images, result_images, correct_mask, path: str, *,
                        query_labels: Optional[Sequence[str]] = None, similarities=None,
                        title: Optional[str] = None, result_labels: Optional[Sequence[Sequence[str]]] = None) -> str:
    """Queries (left column, blue frame) with their top-k results: correct in green, wrong in red frames.

    Args:
      query_images: Q images [H, W, 3] (array [Q, H, W, 3] or a list; uint8 0..255 or float 0..255 / 0..1).
      result_images: Q rows of k images each (array [Q, k, H, W, 3] or nested lists).
      correct_mask: bool [Q, k], True where the result has the query's class.
      path: PNG file to write.
      query_labels: optional Q captions for the queries (e.g. class names; wrapped and shortened to fit).
      similarities: optional float [Q, k] shown under each result.
      title: figure title.
      result_labels: optional [Q][k] captions under the results (e.g. their class names).
    Returns:
      path.
    Raises:
      ValueError: inconsistent numbers of queries / results / mask entries.
    """
    mask = np.asarray(correct_mask, dtype=bool)
    q = len(query_images)
    if mask.ndim != 2 or mask.shape[0] != q or len(result_images) != q:
        raise ValueError(f"plot_retrieval_grid: {q} queries, {len(result_images)} result rows and a correct_mask of "
                         f"shape {mask.shape}; expected [Q, k] with Q = {q}")
    k = mask.shape[1]
    if any(len(row) != k for row in result_images):
        raise ValueError(f"plot_retrieval_grid: every result row must hold k = {k} images (the mask's width)")
    if q == 0 or k == 0:
        raise ValueError("plot_retrieval_grid needs at least one query and one result")
    sims = None if similarities is None else np.asarray(similarities, dtype=np.float64)
    rows = []
    for i in range(q):
        row = [(query_images[i], str(query_labels[i]) if query_labels is not None else "query", _BLUE)]
        for j in range(k):
            caption = f"{j + 1}." + (f" {sims[i, j]:.3f}" if sims is not None else "")
            if result_labels is not None:
                caption += f" {result_labels[i][j]}"
            row.append((result_images[i][j], caption, _GREEN if mask[i, j] else _RED))
        rows.append(row)
    return plot_image_grid(rows, path, title=title)


def plot_retrieval(images, embeddings, labels, path: str, *, num_queries: int = 8, k: int = 5, seed: int = 0,
                   class_names: Optional[Sequence[str]] = None, chunk_size: Optional[int] = None,
                   title: Optional[str] = "nearest neighbours (cosine similarity)") -> str:
    """Chooses seeded random queries, retrieves their k nearest neighbours (`metrics.nearest_neighbors`, self
    excluded) and draws `plot_retrieval_grid`.

    Args:
      images: [N, H, W, 3] images aligned with the embeddings (array, sequence, or callable i -> image).
      embeddings: float [N, E], L2-normalized.
      labels: int [N].
      path: PNG file to write.
      num_queries, k: grid size.
      seed: query choice.
      class_names: optional names indexed by label, shown under the queries.
      chunk_size: see `metrics.nearest_neighbors`.
      title: figure title.
    """
    from hdml_tf.evaluation.metrics import nearest_neighbors

    y = np.asarray(labels)
    get = images if callable(images) else (lambda i: images[i])
    queries = np.random.default_rng(seed).choice(len(y), size=min(num_queries, len(y)), replace=False)
    idx, sim = nearest_neighbors(embeddings, k, chunk_size=chunk_size)
    mask = y[idx[queries]] == y[queries][:, None]
    names = [str(class_names[y[i]]) if class_names is not None else f"class {y[i]}" for i in queries]
    return plot_retrieval_grid([get(int(i)) for i in queries], [[get(int(j)) for j in idx[i]] for i in queries],
                               mask, path, query_labels=names, similarities=sim[queries], title=title)


# -------------------------------------------------------------------------------------------- training curves

def _read_history(history) -> Dict[str, np.ndarray]:
    """{key: float array} from a dict of lists, a keras History, or a CSV file (keras CSVLogger or our eval CSV)."""
    if hasattr(history, "history") and isinstance(history.history, Mapping):
        history = history.history
    if isinstance(history, (str, os.PathLike)):
        if not os.path.exists(history):
            raise ValueError(f"training-curve CSV {history} does not exist")
        with open(history, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"training-curve CSV {history} has no rows")
        history = {key: [row.get(key) for row in rows] for key in rows[0]}
    if not isinstance(history, Mapping):
        raise ValueError("history must be a dict of lists, a keras History or a CSV path, got "
                         f"{type(history).__name__}")
    out = {}
    for key, values in history.items():
        vals = np.atleast_1d(np.asarray([_to_float(v) for v in np.ravel(np.asarray(values, dtype=object))],
                                        dtype=np.float64))
        out[str(key)] = vals
    return out


def _to_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def plot_training_curves(history, path: str, *, keys: Optional[Sequence[str]] = None,
                         title: Optional[str] = None) -> str:
    """One panel per logged loss and the pull factor / synthetic weight, plus a panel of validation metrics.

    Args:
      history: a dict {key: list of values} (`keras.callbacks.History.history`), a History, or a CSV path (Keras
        `CSVLogger` or EvaluationCallback's CSV). The x-axis is the "step" column if present, else "epoch", else
        the row number.
      path: PNG file to write.
      keys: the training keys to draw (default: those of TRAINING_CURVE_KEYS present: loss, j_m, j_syn, j_gen,
        j_recon, j_soft, j_ce, j_avg, j_gen_avg, pull_factor, syn_weight, pulled_fraction). Keys starting with
        "val_" are drawn together in one extra panel. Losses spanning > 3 decades get a log axis.
      title: figure title.
    Returns:
      path.
    Raises:
      ValueError: nothing to draw (the message lists the keys found).
    """
    data = _read_history(history)
    if "step" in data:
        x, x_name = data["step"], "step"
    elif "epoch" in data:
        x, x_name = data["epoch"] + (1 if np.nanmin(data["epoch"], initial=1) == 0 else 0), "epoch"
    else:
        x, x_name = None, "row"
    wanted = [k for k in (keys if keys is not None else TRAINING_CURVE_KEYS) if k in data]
    val_keys = [k for k in data if k.startswith("val_") and np.any(np.isfinite(data[k]))]
    if not wanted and not val_keys:
        raise ValueError(f"no training curve to plot: none of {', '.join(keys or TRAINING_CURVE_KEYS)} or val_* in "
                         f"the history (found: {', '.join(data) or 'nothing'})")
    from matplotlib.ticker import MaxNLocator

    panels = len(wanted) + (1 if val_keys else 0)
    cols = min(3, panels)
    rows = int(math.ceil(panels / cols))
    fig = _figure(4.2 * cols, 3.0 * rows + (0.4 if title else 0.0))
    for p, key in enumerate(wanted):
        ax = fig.add_subplot(rows, cols, p + 1)
        y = data[key]
        xs = x if x is not None and len(x) == len(y) else np.arange(1, len(y) + 1)
        ax.plot(xs, y, color=_BLUE, linewidth=1.2, marker="." if len(y) < 50 else None)
        finite = y[np.isfinite(y)]
        if key not in _FRACTIONS and len(finite) and finite.min() > 0 and finite.max() / finite.min() > 1e3:
            ax.set_yscale("log")
        ax.set_title(_TITLES.get(key, key), fontsize=10)
        ax.set_xlabel(x_name, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and steps are whole numbers
        ax.grid(alpha=0.3)
    if val_keys:
        ax = fig.add_subplot(rows, cols, panels)
        for key in val_keys:
            y = data[key]
            keep = np.isfinite(y)
            xs = x if x is not None and len(x) == len(y) else np.arange(1, len(y) + 1)
            ax.plot(xs[keep], y[keep], marker=".", linewidth=1.2, label=key[4:])
        ax.set_title("validation metrics", fontsize=10)
        ax.set_xlabel(x_name, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and steps are whole numbers
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["plot_tsne", "plot_image_grid", "plot_retrieval_grid", "plot_retrieval", "plot_training_curves",
           "caption_lines", "TRAINING_CURVE_KEYS"]
