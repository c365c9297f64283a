"""tools/embed.py and tools/search.py on a tiny folder whose right neighbours are known.

Three classes of clearly different synthetic images (reddish, bluish, gray; JPEG and PNG, RGB, RGBA and grayscale,
all of different sizes) embedded by a fixed (untrained, seeded) tiny network: images of a class differ by small
noise, classes by their colour, so the nearest neighbour of every image is one of its own class. Plus a text file,
a truncated JPEG and an empty file that must be skipped and listed.
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import load_tool, tiny_backbone
from hdml_tf import retrieval, rundir, serving
from hdml_tf.config import HDMLConfig
from hdml_tf.errors import HDMLError
from hdml_tf.model import HDMLModel

SIZE, RESIZE, EMB = 16, 20, 8
ROOT = pathlib.Path(__file__).resolve().parents[1]
COLORS = {"red": (200, 40, 30), "blue": (30, 50, 210), "gray": (120, 120, 120)}
BAD = ("blue/broken.jpg", "gray/empty.png", "red/notes.txt")


def _image(rng, color, shape, channels=3):
    h, w = shape
    pixels = np.clip(np.array(color, float) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    if channels == 1:
        return pixels[..., :1]
    if channels == 4:
        return np.concatenate([pixels, rng.integers(0, 256, (h, w, 1), dtype=np.uint8)], axis=-1)
    return pixels


def _write(path, image, fmt="png"):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tf.io.encode_jpeg(image, quality=95) if fmt == "jpg" else tf.io.encode_png(image)
    path.write_bytes(data.numpy())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("red", "blue"):
        _write(root / name / "a.png", _image(rng, COLORS[name], (20, 24)))
        _write(root / name / "b.jpg", _image(rng, COLORS[name], (28, 22)), "jpg")
    _write(root / "red" / "c_rgba.png", _image(rng, COLORS["red"], (24, 24), channels=4))
    _write(root / "blue" / "c.png", _image(rng, COLORS["blue"], (18, 30)))
    _write(root / "gray" / "a.png", _image(rng, COLORS["gray"], (22, 30), channels=1))
    _write(root / "gray" / "b.png", _image(rng, COLORS["gray"], (26, 20), channels=1))
    good = tf.io.encode_jpeg(_image(rng, COLORS["blue"], (32, 32))).numpy()
    (root / "blue" / "broken.jpg").write_bytes(good[:len(good) // 3])  # truncated JPEG
    (root / "gray" / "empty.png").write_bytes(b"")
    (root / "red" / "notes.txt").write_text("not an image\n")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: ignored silently
    query = tmp_path_factory.mktemp("queries")
    _write(query / "new_red.png", _image(rng, COLORS["red"], (40, 30)))
    return root, query


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A fixed (seeded, untrained) model as a SavedModel and as a .keras file."""
    tmp = tmp_path_factory.mktemp("models")
    model = HDMLModel(tiny_backbone(SIZE, seed=4), num_classes=3, config=HDMLConfig(embedding_size=EMB))
    saved = serving.export_saved_model(model, str(tmp / "saved"), resize=RESIZE).export_dir
    keras_file = rundir.save_keras(model, str(tmp / "model.keras"), resize=RESIZE)
    return model, saved, keras_file


@pytest.fixture(scope="module")
def index(folder, models, tmp_path_factory):
    root, _ = folder
    out = tmp_path_factory.mktemp("index") / "photos.npz"
    index, report, path = load_tool("embed").embed_folder(models[1], str(root), str(out), batch_size=4, verbose=0)
    return index, report, path


def test_embed_folder_index_contents(index, folder, models):
    idx, report, path = index
    root, _ = folder
    assert path.endswith("photos.npz") and os.path.isfile(path)
    assert idx.paths == ("blue/a.png", "blue/b.jpg", "blue/c.png", "gray/a.png", "gray/b.png", "red/a.png",
                         "red/b.jpg", "red/c_rgba.png")
    assert idx.class_names == ("blue", "gray", "red")
    assert idx.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert idx.embeddings.shape == (8, EMB) and idx.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(idx.embeddings, axis=1), 1.0, atol=1e-5)
    assert report.total == 11 and sorted(os.path.relpath(b.path, root) for b in report.bad) == list(BAD)
    reasons = dict(line.split(": ", 1) for line in idx.skipped)
    assert sorted(reasons) == list(BAD)
    assert reasons["gray/empty.png"] == "zero bytes" and reasons["red/notes.txt"].startswith("not an image")
    assert "JPEG" in reasons["blue/broken.jpg"]
    # What was written reads back, and the embeddings are the model's on each decoded file.
    again = retrieval.load_index(path)
    np.testing.assert_array_equal(again.embeddings, idx.embeddings)
    assert again.paths == idx.paths and again.info == idx.info and again.skipped == idx.skipped
    model = models[0]
    for i, rel in enumerate(idx.paths):
        image = tf.io.decode_image((root / rel).read_bytes(), channels=3, expand_animations=False)[None]
        want = model(serving.preprocess_images(image, SIZE, RESIZE), training=False).numpy()[0]
        np.testing.assert_allclose(idx.embeddings[i], want, atol=1e-5, err_msg=rel)


def test_keras_file_gives_the_same_index(index, folder, models, tmp_path):
    root, _ = folder
    idx, _, _ = load_tool("embed").embed_folder(models[2], str(root), str(tmp_path / "k.npz"), verbose=0)
    assert idx.paths == index[0].paths
    np.testing.assert_allclose(idx.embeddings, index[0].embeddings, atol=1e-5)


def test_search_finds_the_known_neighbours(index, folder, models, tmp_path):
    idx, _, path = index
    root, query = folder
    search = load_tool("search")
    queries = [str(root / p) for p in idx.paths]
    results, skipped, _ = search.search(path, queries + [str(query)], k=2)  # the model recorded in the index
    assert not skipped and len(results) == 9
    for result, rel in zip(results[:8], idx.paths):
        assert result.label == rel.split("/")[0]
        assert result.hits[0].path != rel, "a query is not its own neighbour"
        assert result.hits[0].label == result.label, (rel, [(h.path, h.distance) for h in result.hits])
        assert 0.0 <= result.hits[0].distance <= result.hits[1].distance <= 2.0
        assert result.hits[0].cosine == pytest.approx(1 - result.hits[0].distance ** 2 / 2, abs=1e-5)
    outside = results[8]
    assert outside.label == "" and outside.hits[0].label == "red"
    # Keeping self-matches: each indexed image finds itself at distance ~0.
    self_results, _, _ = search.search(path, queries[:2], model=models[1], k=1, exclude_self=False)
    assert [r.hits[0].path for r in self_results] == list(idx.paths[:2])
    assert all(r.hits[0].distance < 1e-3 for r in self_results)
    lines = search.format_results(results[:1], idx, path)
    assert lines[1] == search.DISTANCE_NOTE and "blue/" in lines[-1]
    # Known classes: plot_retrieval_grid's framed grid; an outside query: unframed, with distances.
    for rows, name in ((results[:3], "labelled.png"), (results[7:], "mixed.png")):
        grid = search.plot_grid(rows, idx, str(tmp_path / name))
        assert pathlib.Path(grid).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_queries_and_errors(index, folder, models, tmp_path):
    idx, _, path = index
    root, _ = folder
    search = load_tool("search")
    results, skipped, _ = search.search(path, [str(root / "red" / "a.png"), str(root / "red" / "notes.txt")], k=1)
    assert len(results) == 1 and len(skipped) == 1 and "notes.txt" in skipped[0]
    with pytest.raises(HDMLError, match="none of the 1 query files"):
        search.search(path, [str(root / "gray" / "empty.png")])
    with pytest.raises(HDMLError, match="query .* not found"):
        search.search(path, [str(tmp_path / "absent.jpg")])
    with pytest.raises(HDMLError, match="index file .* not found"):
        search.search(str(tmp_path / "absent.npz"), [str(root / "red" / "a.png")])
    embed = load_tool("embed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HDMLError, match="is empty"):
        embed.embed_folder(models[1], str(tmp_path / "empty"), str(tmp_path / "e.npz"))
    with pytest.raises(HDMLError, match="not found"):
        embed.embed_folder(models[1], str(tmp_path / "absent"), str(tmp_path / "e.npz"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(HDMLError, match="none of the 1 files"):
        embed.embed_folder(models[1], str(tmp_path / "junk"), str(tmp_path / "e.npz"), verbose=0)
    with pytest.raises(HDMLError, match="model .* not found"):
        embed.embed_folder(str(tmp_path / "absent_model"), str(root), str(tmp_path / "e.npz"))
    with pytest.raises(HDMLError, match="without saved_model.pb"):
        embed.embed_folder(str(tmp_path / "empty"), str(root), str(tmp_path / "e.npz"))


def test_embed_cli_lists_skipped_files_and_errors_are_one_line(folder, models, tmp_path):
    root, _ = folder
    tool = str(ROOT / "tools" / "embed.py")
    done = subprocess.run([sys.executable, tool, f"--model={models[1]}", f"--images={root}",
                           f"--output={tmp_path / 'cli.npz'}", "--batch_size=3"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"embedded 8 images from {root}, 3 classes" in done.stdout
    tail = done.stderr.strip().splitlines()[-4:]
    assert tail[0] == "warning: skipped 3 of 11 files that are not readable images:"
    assert [line.split(":")[0].strip() for line in tail[1:]] == list(BAD)
    assert os.path.isfile(tmp_path / "cli.npz")
    # User errors: one line, exit code 2, no traceback (and no TensorFlow import needed to say so).
    for args, message in [
            ([tool, f"--model={tmp_path / 'absent'}", f"--images={root}"],
             f"error: model {tmp_path / 'absent'} not found; expected a SavedModel directory (tools/export.py "
             "--output), a training run directory, or a .keras / .weights.h5 file"),
            ([str(ROOT / "tools" / "search.py"), f"--index={tmp_path / 'absent.npz'}", f"--query={root}"],
             f"error: index file {tmp_path / 'absent.npz'} not found; write one with tools/embed.py")]:
        failed = subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=120)
        assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [message]
