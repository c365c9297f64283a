"""Backbone construction: shapes, names, preprocessing, LRN variants, mixed precision, ResNet-50 weights offline."""
import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from hdml_tf.backbones import BACKBONES, build_backbone, default_image_size
from hdml_tf.backbones.inception_v1 import LocalResponseNormalization
from hdml_tf.backbones.preprocessing import CaffePreprocessing, SlimPreprocessing
from hdml_tf.errors import HDMLError

# Keras' own save_weights calls np.array on variables, which NumPy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SIZE = 64


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")


@pytest.fixture(scope="module")
def resnet():
    return build_backbone("resnet50", SIZE)


@pytest.mark.parametrize("name", ["inception_v1_caffe", "inception_v1_slim"])
def test_inception_features_shape_dtype_and_uint8(name, images):
    model = build_backbone(name, SIZE)
    features = model(images)
    assert features.shape == (2, 1024) and features.dtype == tf.float32
    assert BACKBONES[name].feature_dim == 1024
    np.testing.assert_allclose(model(images.round().astype(np.uint8)), model(images.round()), rtol=1e-6)
    assert isinstance(model.layers[1], CaffePreprocessing if name.endswith("caffe") else SlimPreprocessing)


def test_default_sizes_and_argument_errors():
    assert default_image_size("inception_v1_caffe") == 227
    assert default_image_size("inception_v1_slim") == 224
    assert default_image_size("resnet50") == 224
    with pytest.raises(HDMLError, match="unknown backbone 'vgg16'"):
        build_backbone("vgg16", SIZE)
    with pytest.raises(HDMLError, match="image_size must be an integer >= 32"):
        build_backbone("inception_v1_slim", 16)
    with pytest.raises(HDMLError, match="caffe_lrn applies to inception_v1_caffe only"):
        build_backbone("inception_v1_slim", SIZE, caffe_lrn=True)
    with pytest.raises(HDMLError, match="no automatic ImageNet download"):
        build_backbone("inception_v1_caffe", SIZE, weights="imagenet")


def test_layer_names_and_layout_details():
    slim = build_backbone("inception_v1_slim", SIZE)
    names = {layer.name for layer in slim.layers}
    assert "Mixed_5b.Branch_2.Conv2d_0a_3x3" in names and "Mixed_5b.Branch_2.Conv2d_0b_3x3" not in names
    assert "Mixed_5c.Branch_2.Conv2d_0b_3x3" in names and "MaxPool_5a_2x2" in names
    assert not any("Logits" in n or "Aux" in n for n in names)
    convs = [layer for layer in slim.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 57 and not any(c.use_bias for c in convs)
    bn = slim.get_layer("Mixed_3b.Branch_1.Conv2d_0b_3x3.BatchNorm")
    assert not bn.scale and bn.center and bn.epsilon == pytest.approx(1e-3)
    assert slim.get_layer("Mixed_4b.Branch_2.Conv2d_0b_3x3").kernel.shape == (3, 3, 16, 48)

    caffe = build_backbone("inception_v1_caffe", SIZE)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in caffe.layers)
    assert caffe.get_layer("inception_4a.5x5").kernel.shape == (5, 5, 16, 48)
    assert caffe.get_layer("conv1.7x7_s2").bias.shape == (64,)
    lrn = [layer for layer in caffe.layers if isinstance(layer, LocalResponseNormalization)]
    assert [layer.name for layer in lrn] == ["pool1.norm1", "conv2.norm2"]
    assert all(layer.depth_radius == 5 and layer.alpha == 1e-4 for layer in lrn)
    frozen = build_backbone("inception_v1_caffe", SIZE, caffe_lrn=True, trainable=False)
    assert frozen.get_layer("pool1.norm1").depth_radius == 2 and not frozen.trainable_weights


def test_preprocessing_hand_worked_values():
    pixels = np.array([[[[0.0, 0.0, 0.0], [255.0, 255.0, 255.0], [10.0, 20.0, 30.0]]]], "float32")  # [1, 1, 3, 3]
    np.testing.assert_allclose(SlimPreprocessing()(pixels)[0, 0],
                               [[-1, -1, -1], [1, 1, 1], [10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1]],
                               rtol=1e-6)
    # RGB (R, G, B) -> (B - 104, G - 117, R - 123): (10, 20, 30) -> (30 - 104, 20 - 117, 10 - 123)
    np.testing.assert_allclose(CaffePreprocessing()(pixels)[0, 0],
                               [[-104, -117, -123], [151, 138, 132], [-74, -97, -113]])
    np.testing.assert_allclose(CaffePreprocessing()(pixels.astype(np.uint8))[0, 0, 2], [-74, -97, -113])


def numpy_lrn(x, radius, alpha, beta=0.75, bias=1.0):
    squares = x.astype(np.float64) ** 2
    channels = x.shape[-1]
    window = np.stack([squares[..., max(0, c - radius): c + radius + 1].sum(-1) for c in range(channels)], -1)
    return x / (bias + alpha * window) ** beta


def test_lrn_official_default_and_caffe_variant_differ():
    x = np.random.default_rng(1).uniform(0, 100, (2, 3, 3, 16)).astype("float32")
    official = LocalResponseNormalization()(x)
    np.testing.assert_allclose(official, tf.nn.local_response_normalization(
        x, depth_radius=5, bias=1.0, alpha=1e-4, beta=0.75), rtol=1e-6)
    np.testing.assert_allclose(official, numpy_lrn(x, 5, 1e-4), rtol=1e-5)
    caffe = LocalResponseNormalization.caffe()(x)
    np.testing.assert_allclose(caffe, numpy_lrn(x, 2, 1e-4 / 5), rtol=1e-5)
    assert np.abs(np.asarray(official) - np.asarray(caffe)).max() > 1.0


def test_mixed_precision_keeps_float32_features(images):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_backbone("inception_v1_caffe", SIZE)
        assert model.get_layer("conv1.7x7_s2").compute_dtype == "float16"
        features = model(images)
    finally:
        keras.config.set_dtype_policy(previous)
    assert features.dtype == tf.float32 and np.all(np.isfinite(features))


def test_saved_model_round_trip(images, tmp_path):
    model = build_backbone("inception_v1_caffe", SIZE, caffe_lrn=True)
    path = str(tmp_path / "backbone.keras")
    model.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path)(images), model(images), rtol=1e-6)


def test_resnet50_offline_features_and_caffe_preprocessing(resnet, images):
    features = resnet(images)
    assert features.shape == (2, 2048) and features.dtype == tf.float32
    inner = resnet.get_layer("resnet50")
    expected = inner(keras.applications.resnet50.preprocess_input(images.copy()))
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)


def test_resnet50_imagenet_offline_is_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3] no network")

    monkeypatch.setattr(keras.src.utils.file_utils, "get_file", offline)
    with pytest.raises(HDMLError) as info:
        build_backbone("resnet50", SIZE, weights="imagenet")
    message = str(info.value)
    assert "\n" not in message and "weights=PATH" in message and "notop" in message


def test_resnet50_loads_local_keras_applications_files(resnet, images, tmp_path):
    """Both forms a user may hold: Keras 3 `.weights.h5` and the legacy `.h5` that keras.applications downloads."""
    from keras.src.legacy.saving import legacy_h5_format

    inner = resnet.get_layer("resnet50")
    modern = str(tmp_path / "resnet50_notop.weights.h5")
    inner.save_weights(modern)
    legacy = str(tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, inner)
    expected = np.asarray(resnet(images))
    for path in (modern, legacy):
        loaded = build_backbone("resnet50", SIZE, weights=path)
        assert loaded.weights_report.assigned == len(inner.weights)
        np.testing.assert_array_equal(np.asarray(loaded(images)), expected)


def test_backbone_knows_what_it_is_after_a_save_and_load(tmp_path):
    """A Backbone's config is its constructor arguments: a round trip (config or .keras file) gives back the same
    name, weights layout and size, and the same features."""
    import keras
    import numpy as np

    from hdml_tf.backbones import Backbone
    net = build_backbone("inception_v1_caffe", 48, caffe_lrn=True)
    assert isinstance(net, Backbone) and (net.backbone_name, net.weights_layout, net.image_size) == (
        "inception_v1_caffe", "caffe", 48)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(net))
    assert isinstance(again, Backbone) and again.get_config() == net.get_config()
    path = str(tmp_path / "net.keras")
    net.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, Backbone)
    assert (loaded.backbone_name, loaded.weights_layout, loaded.caffe_lrn) == ("inception_v1_caffe", "caffe", True)
    images = np.random.default_rng(0).uniform(0, 255, (2, 48, 48, 3)).astype("float32")
    np.testing.assert_allclose(loaded(images).numpy(), net(images).numpy(), rtol=1e-5, atol=1e-6)
    # The Caffe layout's VALID pools need 35 px; the error says so before Keras fails inside.
    with pytest.raises(HDMLError, match=r"image_size must be an integer >= 35 for inception_v1_caffe"):
        build_backbone("inception_v1_caffe", 34)
