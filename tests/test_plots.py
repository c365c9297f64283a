"""Plots are written as valid, non-empty PNG files."""
import csv

import numpy as np
import pytest
from PIL import Image

from hdml_tf.evaluation import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, min_size=(100, 100)):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
        img.verify()
    with Image.open(path) as img:  # not a blank canvas
        assert np.asarray(img.convert("L")).std() > 1.0


def _data(n=60, classes=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n // classes)
    x = rng.standard_normal((n, 8)).astype(np.float32) + 3 * np.eye(8, dtype=np.float32)[y % 8]
    images = rng.integers(0, 255, (n, 24, 24, 3), dtype=np.uint8)
    return x / np.linalg.norm(x, axis=1, keepdims=True), y, images


def test_tsne_png_with_and_without_thumbnails(tmp_path):
    x, y, images = _data()
    index, coords = plots.plot_tsne(x, y, str(tmp_path / "tsne.png"), perplexity=10, max_iter=250)
    assert coords.shape == (60, 2) and len(index) == 60
    _assert_png(tmp_path / "tsne.png", (300, 300))
    plots.plot_tsne(x, y, str(tmp_path / "tsne_images.png"), images=images, max_points=40, max_thumbnails=16,
                    max_iter=250)
    _assert_png(tmp_path / "tsne_images.png", (300, 300))


def test_retrieval_grid_png(tmp_path):
    _, _, images = _data()
    mask = np.array([[True, False, True], [False, False, True]])
    path = plots.plot_retrieval_grid(images[:2], images[2:8].reshape(2, 3, 24, 24, 3), mask,
                                     str(tmp_path / "grid.png"), query_labels=["a", "b"])
    _assert_png(path)
    with pytest.raises(ValueError, match="correct_mask"):
        plots.plot_retrieval_grid(images[:2], images[2:8].reshape(2, 3, 24, 24, 3), mask[:1], str(tmp_path / "x.png"))


def test_plot_retrieval_from_embeddings(tmp_path):
    x, y, images = _data()
    _assert_png(plots.plot_retrieval(images.astype(np.float32) / 255.0, x, y, str(tmp_path / "r.png"),
                                     num_queries=3, k=4))


def test_training_curves_from_dict_and_csv(tmp_path):
    steps = np.arange(1, 21)
    history = {"loss": list(1.0 / steps), "j_m": list(2.0 / steps), "j_soft": list(1e4 / steps ** 3),
               "pull_factor": list(np.exp(-90.0 / (1 + steps))), "syn_weight": list(1 - np.exp(-steps / 5.0)),
               "val_recall@1": [float("nan")] * 19 + [0.5]}
    _assert_png(plots.plot_training_curves(history, str(tmp_path / "curves.png")), (400, 200))
    csv_path = tmp_path / "log.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "loss", "j_gen", "pulled_fraction"])
        for e in range(5):
            writer.writerow([e, 1.0 / (e + 1), 0.5 + e, 0.1 * e])
    _assert_png(plots.plot_training_curves(str(csv_path), str(tmp_path / "curves_csv.png")), (400, 200))
    with pytest.raises(ValueError, match="no training curve"):
        plots.plot_training_curves({"accuracy": [1, 2]}, str(tmp_path / "none.png"))
