"""The embedded glyph data set: distinct classes, zero-shot split, determinism, distortion, cache."""
import os

import numpy as np
import pytest

from hdml_tf.config import ConfigError
from hdml_tf.data import glyphs
from hdml_tf.errors import HDMLError

SIZE = 32  # small images keep the suite fast; the layout scales with the size
RENDERINGS = 2


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("glyph_cache"))


@pytest.fixture(scope="module")
def data(cache_dir):
    return glyphs.load_glyphs(image_size=SIZE, renderings_per_font=RENDERINGS, seed=0, cache_dir=cache_dir)


def _pairwise_shifted_distance(images, shift=1):
    """Brute force over integer shifts: [F, C, S, S] -> [F, C, C] min relative L2 distance, same font.

    d(x, y) = ||x - y|| / sqrt((||x||^2 + ||y||^2) / 2), minimized over moving x by up to `shift` pixels each way.
    """
    n_fonts, n_chars, size, _ = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (shift, shift), (shift, shift)))
    base = images.reshape(n_fonts, n_chars, -1)
    base_t = np.ascontiguousarray(base.transpose(0, 2, 1))
    base_sq = (base ** 2).sum(-1)
    best = np.full((n_fonts, n_chars, n_chars), np.inf, np.float32)
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            moved = padded[:, :, dy:dy + size, dx:dx + size].reshape(n_fonts, n_chars, -1)
            moved_sq = (moved ** 2).sum(-1)
            total = moved_sq[:, :, None] + base_sq[:, None, :]
            sq = np.maximum(total - 2 * moved @ base_t, 0)
            best = np.minimum(best, np.sqrt(sq / (total / 2)))
    return np.minimum(best, best.transpose(0, 2, 1))


def test_class_tables():
    assert len(glyphs.CANDIDATES) == 176 and len(set(glyphs.CANDIDATES)) == 176
    assert len(glyphs.LOOKALIKES) == 43
    assert glyphs.CLASSES == "".join(c for c in glyphs.CANDIDATES if c not in glyphs.LOOKALIKES)
    assert len(glyphs.CLASSES) == 133
    for dropped, kept in glyphs.LOOKALIKES.items():
        assert dropped in glyphs.CANDIDATES and kept in glyphs.CLASSES, (dropped, kept)
    assert len(glyphs.FONT_FILES) == 16 and all(os.path.isfile(p) for p in glyphs.glyph_fonts())


def test_no_two_classes_render_alike():
    assert glyphs.glyph_confusable_pairs() == []
    # Not a close call: still none with a threshold 20 % higher.
    assert glyphs.glyph_confusable_pairs(threshold=1.2 * glyphs.CONFUSABLE_THRESHOLD) == []


def test_criterion_flags_every_dropped_lookalike():
    flagged = {frozenset(pair[:2]) for pair in glyphs.glyph_confusable_pairs(glyphs.CANDIDATES)}
    missed = [(d, k) for d, k in glyphs.LOOKALIKES.items() if frozenset((d, k)) not in flagged]
    assert not missed
    # Size-only case pairs are told apart by size, not flagged.
    assert not flagged & {frozenset("cC"), frozenset("oO"), frozenset("жЖ"), frozenset("яЯ")}


def test_independent_pixel_check_finds_no_copies():
    """Direct pixel comparison of the undistorted renderings, independent of the criterion's normalization."""
    threshold = 0.1
    distance = _pairwise_shifted_distance(glyphs.render_glyphs(SIZE, glyphs.CLASSES))
    n = len(glyphs.CLASSES)
    closest = distance.min(0)[np.triu_indices(n, 1)]
    assert closest.min() > threshold
    # The same check does see the copies among the candidates (e.g. Latin A / Greek Alpha / Cyrillic A).
    pairs = ["AΑ", "AА", "oο", "oо", "pр", "3З", "uи", "ΦФ"]
    distance = _pairwise_shifted_distance(glyphs.render_glyphs(SIZE, "".join(pairs))).min(0)
    for k, pair in enumerate(pairs):
        assert distance[2 * k, 2 * k + 1] < threshold, pair


def test_split_by_class(data):
    train, test = data
    assert train.name == "glyphs/train" and test.name == "glyphs/test"
    assert not set(train.class_names) & set(test.class_names)
    assert sorted(train.class_names + test.class_names) == sorted(glyphs.CLASSES)
    assert (train.num_classes, test.num_classes) == (67, 66)
    assert ("".join(train.class_names), "".join(test.class_names)) == glyphs.split_classes(0)
    for group in glyphs.SCRIPT_GROUPS.values():  # every script on both sides
        assert set(group) & set(train.class_names) and set(group) & set(test.class_names)
    assert glyphs.split_classes(1) != glyphs.split_classes(0)
    for part in data:
        assert part.original_class_ids == [ord(c) for c in part.class_names]
        np.testing.assert_array_equal(np.bincount(part.labels), len(glyphs.FONT_FILES) * RENDERINGS)


def test_shapes_and_values(data):
    for part in data:
        assert part.images.dtype == np.uint8
        assert part.images.shape == (len(part.labels), SIZE, SIZE, 3)
        assert part.labels.dtype == np.int64 and part.labels.min() == 0
        assert part.labels.max() == part.num_classes - 1
        np.testing.assert_array_equal(part.images[..., 0], part.images[..., 2])  # grey as RGB
        gray = part.images[..., 0]
        assert np.median(gray) == 255  # white background
        assert (gray.min(axis=(1, 2)) < 64).all()  # every image has dark ink


def test_deterministic_under_seed(data, tmp_path):
    train, test = glyphs.load_glyphs(image_size=SIZE, renderings_per_font=RENDERINGS, seed=0,
                                     cache_dir=str(tmp_path / "again"))
    np.testing.assert_array_equal(train.images, data[0].images)
    np.testing.assert_array_equal(test.images, data[1].images)
    other, _ = glyphs.load_glyphs(image_size=SIZE, renderings_per_font=RENDERINGS, seed=1,
                                  cache_dir=str(tmp_path / "other"))
    assert other.class_names != train.class_names


def test_distortion_varies_renderings(data):
    train = data[0]
    per_font = train.images[..., 0].reshape(train.num_classes, len(glyphs.FONT_FILES), RENDERINGS, SIZE, SIZE)
    undistorted = 255 - np.rint(255 * glyphs.render_glyphs(SIZE, train.class_names)).astype(np.uint8)
    diff_renderings = np.abs(per_font[:, :, 0].astype(int) - per_font[:, :, 1]).mean(axis=(-2, -1))
    diff_undistorted = np.abs(per_font[:, :, 0].astype(int) - undistorted.transpose(1, 0, 2, 3)).mean(axis=(-2, -1))
    assert (diff_renderings > 0).all() and (diff_undistorted > 0).all()
    assert diff_renderings.mean() > 5  # grey levels: clearly moved, not jittered by a pixel


def test_identity_distortion_gives_the_undistorted_rendering(monkeypatch, tmp_path):
    monkeypatch.setattr(glyphs, "DISTORTION", glyphs.Distortion(rotation_deg=0, shear=0, scale=(1, 1), shift=0))
    train, _ = glyphs.load_glyphs(image_size=SIZE, renderings_per_font=1, seed=0, cache_dir=str(tmp_path))
    expected = 255 - np.rint(255 * glyphs.render_glyphs(SIZE, train.class_names)).astype(np.uint8)
    np.testing.assert_array_equal(train.images[..., 0], expected.transpose(1, 0, 2, 3).reshape(-1, SIZE, SIZE))


def test_cache_round_trip(data, cache_dir, monkeypatch, caplog):
    files = [f for f in os.listdir(cache_dir) if f.endswith(".npz")]
    assert len(files) == 1 and files[0].startswith(f"glyphs_s{SIZE}_r{RENDERINGS}_seed0_")

    def no_rendering(*args):
        raise AssertionError("rendered although cached")

    with monkeypatch.context() as patch:
        patch.setattr(glyphs, "_render_set", no_rendering)
        train, test = glyphs.load_glyphs(image_size=SIZE, renderings_per_font=RENDERINGS, seed=0,
                                         cache_dir=cache_dir)
    np.testing.assert_array_equal(train.images, data[0].images)
    assert test.class_names == data[1].class_names
    # A damaged cache file is rendered again and replaced.
    path = os.path.join(cache_dir, files[0])
    with open(path, "wb") as handle:
        handle.write(b"not a zip file")
    train, _ = glyphs.load_glyphs(image_size=SIZE, renderings_per_font=RENDERINGS, seed=0, cache_dir=cache_dir)
    np.testing.assert_array_equal(train.images, data[0].images)
    assert "ignoring unreadable cache" in caplog.text
    assert os.path.getsize(path) > 1000


@pytest.mark.parametrize("kwargs", [dict(image_size=8), dict(image_size=32.0), dict(renderings_per_font=0),
                                    dict(seed=-1)])
def test_bad_arguments(kwargs, tmp_path):
    with pytest.raises(ConfigError) as info:
        glyphs.load_glyphs(cache_dir=str(tmp_path), **kwargs)
    assert isinstance(info.value, HDMLError)
    assert not os.listdir(tmp_path)
