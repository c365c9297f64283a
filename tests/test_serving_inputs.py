"""Serving inputs (issue 14, item 9): an empty batch, NaN / Inf pixels, one bad item among many encoded images.

Each is checked inside the SavedModel's graph, so a TF Serving client gets the same answer as the Python embedders,
which turn it into one line naming the batch index. Before, an empty batch failed with "Incompatible shapes" deep in
the network, NaN pixels were rounded to black and embedded silently, and one undecodable image failed the whole
batch without saying which.
"""
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_backbone
from hdml_tf import serving
from hdml_tf.config import HDMLConfig
from hdml_tf.errors import HDMLError
from hdml_tf.model import HDMLModel

SIZE, RESIZE, EMB = 16, 20, 8


@pytest.fixture(scope="module")
def model():
    return HDMLModel(tiny_backbone(SIZE, seed=3), num_classes=3, config=HDMLConfig(embedding_size=EMB))


@pytest.fixture(scope="module")
def embedders(model, tmp_path_factory):
    """The in-process embedder and the exported SavedModel loaded back (the same checks in both)."""
    info = serving.embedding_info(model.embedder(), SIZE, RESIZE)
    export_dir = serving.export_saved_model(model, str(tmp_path_factory.mktemp("x") / "saved"), resize=RESIZE).export_dir
    return {"in-process": serving.ModelEmbedder(model, info), "SavedModel": serving.SavedModelEmbedder(export_dir)}


def _png(rng, h=24, w=30):
    return tf.io.encode_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).numpy()


@pytest.mark.parametrize("which", ["in-process", "SavedModel"])
def test_an_empty_batch_returns_an_empty_result(embedders, which):
    embed = embedders[which]
    for images in (np.zeros((0, RESIZE, RESIZE, 3), np.uint8), np.zeros((0, 33, 17, 3), np.float32)):
        result = embed(images)
        assert result.shape == (0, EMB) and result.dtype == np.float32
    assert embed.embed_bytes([]).shape == (0, EMB)


@pytest.mark.parametrize("which", ["in-process", "SavedModel"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_pixels_are_an_error_naming_the_image(embedders, which, bad):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (5, RESIZE, RESIZE, 3)).astype(np.float32)
    reference = embedders[which](images)  # finite images embed, and are not all alike
    assert np.isfinite(reference).all() and not np.allclose(reference[0], reference[1])
    images[1, 3, 4, 0] = bad
    images[3, 0, 0, 2] = bad
    with pytest.raises(HDMLError, match=r"^batch item\(s\) 1, 3 hold NaN or Inf pixel values \(expected finite "
                                        r"values 0\.\.255\)$"):
        embedders[which](images)


@pytest.mark.parametrize("which", ["in-process", "SavedModel"])
def test_a_bad_item_among_encoded_images_is_reported_by_its_index(embedders, which):
    rng = np.random.default_rng(1)
    good = [_png(rng) for _ in range(4)]
    embed = embedders[which]
    expected = embed.embed_bytes(good)
    assert expected.shape == (4, EMB)
    # Each item alone gives its own row: the batch is decoded item by item.
    np.testing.assert_allclose(embed.embed_bytes(good[2:3])[0], expected[2], atol=1e-6)
    for items, message in [
        (good[:2] + [b"<html>a login page</html>"] + good[2:], r"^batch item\(s\) 2 hold bytes that are not a JPEG, "
                                                               r"PNG, GIF, BMP or WebP image$"),
        ([b""] + good, r"^batch item\(s\) 0 hold bytes that are not"),
        (good[:3] + [good[3][:40]], r"^batch item 3 of 4 cannot be decoded as an image: "),  # a truncated PNG
    ]:
        with pytest.raises(HDMLError, match=message):
            embed.embed_bytes(items)


def test_the_saved_model_signatures_check_their_inputs_without_hdml_tf(embedders):
    """A TF Serving client calls the signatures directly: the graph itself returns [0, E] for an empty batch and
    fails with a message naming the index for NaN pixels and non-image bytes."""
    loaded = tf.saved_model.load(embedders["SavedModel"].source)
    empty = loaded.signatures["serving_default"](images=tf.zeros([0, 10, 10, 3]))["embeddings"]
    assert empty.shape == (0, EMB)
    nan = np.zeros((3, 10, 10, 3), np.float32)
    nan[2, 0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"NaN or Inf pixel values.*at batch index:\] \[2\]"):
        loaded.signatures["serving_default"](images=tf.constant(nan))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"not a JPEG, PNG, GIF, BMP or WebP image, at batch "
                                                             r"index:\] \[1\]"):
        loaded.signatures["embed_bytes"](image_bytes=tf.constant([_png(np.random.default_rng(2)), b"text"]))
