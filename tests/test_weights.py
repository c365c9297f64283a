"""Loading ImageNet weights: the published Caffe .mat key set, a TF-Slim checkpoint, damaged and foreign files.

The Caffe fixture has exactly the arrays of the published tf_ckpt_from_caffe.mat (tests/data/
caffe_googlenet_mat_arrays.csv, transcribed from github Wei2624/Feature_Embed_GoogLeNet), not names derived from the
model. The slim name table below is transcribed independently of hdml_tf from TF-Slim's nets/inception_v1.py. Every
kernel is He-scaled (std sqrt(2 / fan_in)), so the features depend on every layer: the reference forward passes
(plain tf.nn ops over the same arrays, in the official code's order of operations) are compared to tight tolerance,
and a reference with one deliberately wrong layer must FAIL the same comparison (negative controls).
"""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import tensorflow as tf

from conftest import DATA, load_tool
from hdml_tf.backbones import build_backbone, detect_format, load_backbone_weights
from hdml_tf.errors import WeightsError

# Keras' own save_weights calls np.array on variables, which NumPy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
PUBLISHED_MAT = DATA / "caffe_googlenet_mat_arrays.csv"
# (slim end point, Caffe block, input channels, (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj))
BLOCKS = [
    ("Mixed_3b", "inception_3a", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", "inception_3b", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", "inception_4a", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", "inception_4b", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", "inception_4c", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", "inception_4d", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", "inception_4e", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", "inception_5a", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", "inception_5b", 832, (384, 192, 384, 48, 128, 128)),
]
STEM = [  # (slim, Caffe, kernel, in, out)
    ("Conv2d_1a_7x7", "conv1/7x7_s2", 7, 3, 64),
    ("Conv2d_2b_1x1", "conv2/3x3_reduce", 1, 64, 64),
    ("Conv2d_2c_3x3", "conv2/3x3", 3, 64, 192),
]
NOT_BACKBONE = {"fc_embedding", "fc_embedding_bias", "__header__", "__version__", "__globals__"}


def slim_branch_names(block):
    """Slim's six convolutions of a block; Mixed_5b's Branch_2 3x3 is named Conv2d_0a_3x3 in slim's code."""
    third = "Conv2d_0a_3x3" if block == "Mixed_5b" else "Conv2d_0b_3x3"
    return [f"{block}/Branch_0/Conv2d_0a_1x1", f"{block}/Branch_1/Conv2d_0a_1x1", f"{block}/Branch_1/Conv2d_0b_3x3",
            f"{block}/Branch_2/Conv2d_0a_1x1", f"{block}/Branch_2/{third}", f"{block}/Branch_3/Conv2d_0b_1x1"]


def caffe_branch_names(block):
    return [f"{block}/{n}" for n in ("1x1", "3x3_reduce", "3x3", "5x5_reduce", "5x5", "pool_proj")]


def conv_table(layout):
    """[(source name, kernel, in, out)] of all 57 convolutions."""
    rows = [(s if layout == "slim" else c, k, i, o) for s, c, k, i, o in STEM]
    for slim, caffe, cin, (b0, b1r, b1, b2r, b2, b3) in BLOCKS:
        names = slim_branch_names(slim) if layout == "slim" else caffe_branch_names(caffe)
        k5 = 3 if layout == "slim" else 5
        shapes = [(1, cin, b0), (1, cin, b1r), (3, b1r, b1), (1, cin, b2r), (k5, b2r, b2), (1, cin, b3)]
        rows += [(n,) + s for n, s in zip(names, shapes)]
    return rows


def he(rng, shape, fan_in):
    """He-scaled normal values: std sqrt(2 / fan_in) keeps activations at unit scale through ReLU layers."""
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype("f4")


def make_slim_arrays(seed=1):
    """{checkpoint name: array} of the released inception_v1.ckpt (plus its classifier and global_step)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, k, cin, cout in conv_table("slim"):
        scope = f"InceptionV1/{name}"
        arrays[f"{scope}/weights"] = he(rng, (k, k, cin, cout), k * k * cin)
        arrays[f"{scope}/BatchNorm/beta"] = rng.normal(0, 0.1, cout).astype("f4")
        arrays[f"{scope}/BatchNorm/moving_mean"] = rng.normal(0, 0.1, cout).astype("f4")
        arrays[f"{scope}/BatchNorm/moving_variance"] = rng.uniform(0.5, 1.5, cout).astype("f4")
    arrays["InceptionV1/Logits/Conv2d_0c_1x1/weights"] = rng.normal(0, 0.01, (1, 1, 1024, 1001)).astype("f4")
    arrays["InceptionV1/Logits/Conv2d_0c_1x1/biases"] = np.zeros(1001, "f4")
    return arrays


def published_mat_shapes():
    """{name: shape} of the published tf_ckpt_from_caffe.mat, from the transcription in tests/data."""
    shapes = {}
    for line in PUBLISHED_MAT.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, dims = line.split(",")
            shapes[name] = tuple(int(d) for d in dims.split())
    return shapes


def make_published_mat_arrays(seed=2):
    """Random arrays with exactly the published key set and stored shapes; kernels (out, in, h, w) He-scaled."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in published_mat_shapes().items():
        if name.endswith("_bias"):
            arrays[name] = rng.normal(0, 0.1, shape).astype("f4")
        else:
            arrays[name] = he(rng, shape, int(np.prod(shape[1:])))
    return arrays


def write_checkpoint(arrays, prefix):
    """A TF1 name-based checkpoint: tf.compat.v1 variables saved by a Saver inside a graph."""
    graph = tf.Graph()
    with graph.as_default():
        variables = {name: tf.compat.v1.Variable(value, name=name.replace("/", "_")) for name, value in
                     arrays.items()}
        variables["global_step"] = tf.compat.v1.Variable(np.int64(1000), name="global_step")
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            return saver.save(session, prefix, write_meta_graph=False)


@pytest.fixture(scope="module")
def slim_file(tmp_path_factory):
    arrays = make_slim_arrays()
    prefix = write_checkpoint(arrays, str(tmp_path_factory.mktemp("slim") / "inception_v1.ckpt"))
    return prefix, arrays


@pytest.fixture(scope="module")
def caffe_file(tmp_path_factory):
    arrays = make_published_mat_arrays()
    path = str(tmp_path_factory.mktemp("caffe") / "tf_ckpt_from_caffe.mat")
    scipy.io.savemat(path, arrays)
    assert set(scipy.io.loadmat(path)) == set(published_mat_shapes()) | {"__header__", "__version__",
                                                                         "__globals__"}
    return path, arrays


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")


@pytest.fixture(scope="module")
def caffe_victim():
    """A Caffe backbone that failing loads must leave exactly as it was."""
    return build_backbone("inception_v1_caffe", SIZE)


@pytest.fixture(scope="module")
def slim_victim():
    return build_backbone("inception_v1_slim", SIZE)


def refused(model, path, **kwargs) -> str:
    """Loads `path` into `model` expecting a WeightsError; asserts no weight changed and the message is one line."""
    before = [np.array(w.numpy(), copy=True) for w in model.weights]
    with pytest.raises(WeightsError) as info:
        load_backbone_weights(model, path, **kwargs)
    after = [w.numpy() for w in model.weights]
    assert all(np.array_equal(b, a) for b, a in zip(before, after)), "a failed load changed weights"
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


# ----------------------------------------------------------------------------------------------------------------
# Reference forward passes in plain tf.nn ops
# ----------------------------------------------------------------------------------------------------------------
def ref_slim_conv(x, a, name, stride=1):
    scope = f"InceptionV1/{name}"
    y = tf.nn.conv2d(x, a[f"{scope}/weights"], stride, "SAME")
    y = (y - a[f"{scope}/BatchNorm/moving_mean"]) / np.sqrt(a[f"{scope}/BatchNorm/moving_variance"] + 1e-3)
    return tf.nn.relu(y + a[f"{scope}/BatchNorm/beta"])


def ref_slim(images, a, pool_5a=2):
    """TF-Slim inception_v1_base at inference: returns (stem output, Mixed_3b, pooled [B, 1024]).

    pool_5a: window of MaxPool_5a (slim's is 2; 3 is the deliberate mistake of the negative control).
    """
    x = images / 127.5 - 1.0
    x = ref_slim_conv(x, a, "Conv2d_1a_7x7", 2)
    x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    x = ref_slim_conv(x, a, "Conv2d_2b_1x1")
    x = ref_slim_conv(x, a, "Conv2d_2c_3x3")
    stem = x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    outs = {}
    for slim, _, _, _ in BLOCKS:
        if slim == "Mixed_4b":
            x = tf.nn.max_pool2d(x, 3, 2, "SAME")
        if slim == "Mixed_5b":
            x = tf.nn.max_pool2d(x, pool_5a, 2, "SAME")
        n = slim_branch_names(slim)
        x = tf.concat([ref_slim_conv(x, a, n[0]),
                       ref_slim_conv(ref_slim_conv(x, a, n[1]), a, n[2]),
                       ref_slim_conv(ref_slim_conv(x, a, n[3]), a, n[4]),
                       ref_slim_conv(tf.nn.max_pool2d(x, 3, 1, "SAME"), a, n[5])], axis=3)
        outs[slim] = x
    return stem, outs["Mixed_3b"], tf.reduce_mean(x, axis=[1, 2])


def ref_caffe_conv(x, a, name, stride=1):
    w = np.transpose(a[name], (2, 3, 1, 0))
    p = w.shape[0] // 2
    y = tf.nn.conv2d(tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]]), w, stride, "VALID")
    return tf.nn.relu(y + a[f"{name}_bias"].reshape(-1))


def ref_caffe_pool(x, pad=True, where=(0, 1)):
    """Official: tf.pad bottom/right by one, then a VALID 3x3 / 2 max pool (Caffe's ceil-mode size)."""
    if pad:
        x = tf.pad(x, [[0, 0], list(where), list(where), [0, 0]])
    return tf.nn.max_pool2d(x, 3, 2, "VALID")


def ref_caffe(images, a, radius=5, alpha=1e-4, pool_pad=(0, 1)):
    """The official GoogleNet_Model.forward: returns (stem output, inception_3a, pooled [B, 1024]).

    pool_pad: (before, after) padding of pool3 and pool4; (1, 0) is the deliberate mistake of a negative control.
    """
    x = images[..., ::-1] - np.array([104.0, 117.0, 123.0], "f4")  # RGB -> BGR minus the mean, FLAGS.image_mean
    lrn = dict(depth_radius=radius, bias=1.0, alpha=alpha, beta=0.75)
    x = ref_caffe_conv(x, a, "conv1/7x7_s2", 2)
    x = tf.nn.local_response_normalization(ref_caffe_pool(x), **lrn)
    x = ref_caffe_conv(x, a, "conv2/3x3_reduce")
    x = tf.nn.local_response_normalization(ref_caffe_conv(x, a, "conv2/3x3"), **lrn)
    stem = x = ref_caffe_pool(x, pad=False)
    outs = {}
    for _, caffe, _, _ in BLOCKS:
        if caffe in ("inception_4a", "inception_5a"):
            x = ref_caffe_pool(x, where=pool_pad)
        n = caffe_branch_names(caffe)
        pooled = tf.nn.max_pool2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), 3, 1, "VALID")
        x = tf.concat([ref_caffe_conv(x, a, n[0]),
                       ref_caffe_conv(ref_caffe_conv(x, a, n[1]), a, n[2]),
                       ref_caffe_conv(ref_caffe_conv(x, a, n[3]), a, n[4]),
                       ref_caffe_conv(pooled, a, n[5])], axis=3)
        outs[caffe] = x
    return stem, outs["inception_3a"], tf.reduce_mean(x, axis=[1, 2])


def taps(model, names):
    """The model's outputs at the named layers plus its final features."""
    import keras
    return keras.Model(model.input, [model.get_layer(n).output for n in names] + [model.output])


def assert_close(got, want):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def assert_control_fails(got, wrong):
    """Negative control: a reference with one wrong layer must fail `assert_close`, by far more than round-off."""
    with pytest.raises(AssertionError):
        assert_close(got, wrong)
    got, wrong = np.asarray(got), np.asarray(wrong)
    assert np.abs(got - wrong).max() > 100 * 1e-4 * max(1.0, float(np.abs(wrong).max()))


# ----------------------------------------------------------------------------------------------------------------
# The published Caffe .mat
# ----------------------------------------------------------------------------------------------------------------
def test_published_key_set_is_the_architecture_plus_fc_embedding():
    """Two independent transcriptions agree: the published list of arrays (tests/data) and the GoogLeNet table
    written here from the official loader; the only extra layer is fc_embedding."""
    shapes = published_mat_shapes()
    expected = {}
    for name, k, cin, cout in conv_table("caffe"):
        expected[name] = (cout, cin, k, k)
        expected[f"{name}_bias"] = (1, cout)
    expected.update({"fc_embedding": (64, 1024), "fc_embedding_bias": (1, 64)})
    assert shapes == expected and len(shapes) == 2 * 57 + 2


def test_published_caffe_mat_loads_and_matches_plain_tf_forward(caffe_file, images, caplog):
    path, arrays = caffe_file
    with caplog.at_level(logging.INFO, logger="hdml_tf.backbones.weights"):
        model = build_backbone("inception_v1_caffe", SIZE, weights=path)
    report = model.weights_report
    assert report.format == "caffe" and report.assigned == len(model.weights) == 57 * 2
    assert report.values == sum(arrays[n].size + arrays[n + "_bias"].size for n, _, _, _ in conv_table("caffe"))
    assert set(report.skipped) == NOT_BACKBONE
    lines = [r.getMessage() for r in caplog.records if r.name == "hdml_tf.backbones.weights"]
    assert len(lines) == 1 and all(name in lines[0] for name in NOT_BACKBONE), lines  # ONE info line names them
    assert caplog.records[-1].levelno == logging.INFO
    for name, _, _, _ in conv_table("caffe"):
        layer = model.get_layer(name.replace("/", "."))
        np.testing.assert_array_equal(layer.kernel.numpy(), np.transpose(arrays[name], (2, 3, 1, 0)))
        np.testing.assert_array_equal(layer.bias.numpy(), arrays[name + "_bias"].reshape(-1))

    stem, block, pooled = taps(model, ["pool2.3x3_s2", "inception_3a.output"])(images)
    ref_stem, ref_block, ref_pooled = ref_caffe(tf.constant(images), arrays)
    assert_close(stem, ref_stem)
    assert_close(block, ref_block)
    assert_close(pooled, ref_pooled)
    assert float(np.std(pooled)) > 0.1  # He-scaled weights: features of unit order, not ~0
    # Negative control: pool3/pool4 padded top/left instead of bottom/right -- an off-by-one a test must catch.
    assert_control_fails(pooled, ref_caffe(tf.constant(images), arrays, pool_pad=(1, 0))[2])

    # Caffe's own LRN is a different network on the same weights; it too matches the reference with radius 2.
    caffe_lrn = build_backbone("inception_v1_caffe", SIZE, weights=path, caffe_lrn=True)
    other = caffe_lrn(images)
    assert_close(other, ref_caffe(tf.constant(images), arrays, radius=2, alpha=2e-5)[2])
    assert_control_fails(other, pooled)


def test_caffe_bias_as_column_and_imagenet_heads_are_skipped(caffe_file, images, tmp_path):
    """Biases stored as n x 1 columns load like rows (the official code flattens); loss1/2/3 heads are skipped."""
    path, arrays = caffe_file
    heads = {}
    for key, shape in [("loss1/conv", (128, 512, 1, 1)), ("loss1/fc", (1024, 2048)),
                       ("loss1/classifier", (1000, 1024)), ("loss2/conv", (128, 528, 1, 1)),
                       ("loss3/classifier", (1000, 1024))]:
        heads[key] = np.zeros(shape, "f4")
        heads[f"{key}_bias"] = np.zeros(shape[0], "f4")
    column = str(tmp_path / "column.mat")
    flat_biases = {k: v.reshape(-1) if k.endswith("_bias") else v for k, v in arrays.items()}
    scipy.io.savemat(column, {**flat_biases, **heads}, oned_as="column")
    assert scipy.io.loadmat(column)["conv1/7x7_s2_bias"].shape == (64, 1)
    model = build_backbone("inception_v1_caffe", SIZE, weights=column)
    assert set(model.weights_report.skipped) == NOT_BACKBONE | set(heads)
    np.testing.assert_array_equal(np.asarray(model(images)),
                                  np.asarray(build_backbone("inception_v1_caffe", SIZE, weights=path)(images)))


# ----------------------------------------------------------------------------------------------------------------
# TF-Slim
# ----------------------------------------------------------------------------------------------------------------
def test_slim_checkpoint_lands_by_name_and_matches_tf_nn(slim_file, images):
    prefix, arrays = slim_file
    model = build_backbone("inception_v1_slim", SIZE)
    report = load_backbone_weights(model, prefix)
    assert report.format == "slim" and report.assigned == len(model.weights) == 57 * 4
    assert set(report.skipped) == {"InceptionV1/Logits/Conv2d_0c_1x1/weights",
                                   "InceptionV1/Logits/Conv2d_0c_1x1/biases", "global_step"}
    for name, _, _, _ in conv_table("slim"):  # every array sits in the layer its name says
        layer = name.replace("/", ".")
        np.testing.assert_array_equal(model.get_layer(layer).kernel.numpy(),
                                      arrays[f"InceptionV1/{name}/weights"])
        bn = model.get_layer(layer + ".BatchNorm")
        for var in ("beta", "moving_mean", "moving_variance"):
            np.testing.assert_array_equal(getattr(bn, var).numpy(), arrays[f"InceptionV1/{name}/BatchNorm/{var}"])
    assert model.get_layer("Mixed_5b.Branch_2.Conv2d_0a_3x3").kernel.shape == (3, 3, 32, 128)

    stem, block, pooled = taps(model, ["MaxPool_3a_3x3", "Mixed_3b"])(images)
    ref_stem, ref_block, ref_pooled = ref_slim(tf.constant(images), arrays)
    assert_close(stem, ref_stem)
    assert_close(block, ref_block)
    assert pooled.shape == (2, 1024)
    assert_close(pooled, ref_pooled)
    assert float(np.std(pooled)) > 0.1
    # Negative control: MaxPool_5a with a 3x3 window instead of slim's 2x2 must fail the comparison.
    assert_control_fails(pooled, ref_slim(tf.constant(images), arrays, pool_5a=3)[2])


# ----------------------------------------------------------------------------------------------------------------
# Mismatches and damaged files: one line, and nothing written
# ----------------------------------------------------------------------------------------------------------------
def test_mismatches_stop_the_load_with_one_error_listing_all(caffe_file, caffe_victim, tmp_path):
    path, arrays = caffe_file
    bad = dict(arrays)
    del bad["inception_4c/3x3_reduce"]                                  # missing
    bad["inception_9z/1x1"] = np.zeros((4, 4, 1, 1), "f4")              # unexpected
    bad["inception_3a/5x5"] = np.zeros((32, 16, 3, 3), "f4")            # mis-shaped (a 3x3 where Caffe has 5x5)
    bad_path = str(tmp_path / "bad.mat")
    scipy.io.savemat(bad_path, bad)
    message = refused(caffe_victim, bad_path)
    assert message.startswith(f"{bad_path} is a Caffe GoogLeNet .mat that does not match inception_v1_caffe, "
                              "nothing was loaded")
    assert "missing 1: inception_4c/3x3_reduce" in message
    assert "unexpected 1: inception_9z/1x1" in message
    assert ("mis-shaped 1: inception_3a/5x5 stored [32, 16, 3, 3], read as Caffe (out, in, h, w) and transposed "
            "(2, 3, 1, 0) to [3, 3, 16, 32]; the layer needs (h, w, in, out) [5, 5, 16, 32]") in message


def test_kernel_in_tensorflow_order_names_the_stored_shape_and_the_transposition(caffe_file, caffe_victim, tmp_path):
    path, arrays = caffe_file
    bad = dict(arrays, **{"inception_3a/3x3": np.transpose(arrays["inception_3a/3x3"], (2, 3, 1, 0))})
    bad_path = str(tmp_path / "hwio.mat")
    scipy.io.savemat(bad_path, bad)
    message = refused(caffe_victim, bad_path)
    assert ("inception_3a/3x3 stored [3, 3, 96, 128], read as Caffe (out, in, h, w) and transposed (2, 3, 1, 0) to "
            "[96, 128, 3, 3]; the layer needs (h, w, in, out) [3, 3, 96, 128]; the file holds it in TensorFlow's "
            "(h, w, in, out) order already") in message


def test_a_foreign_mat_is_named_briefly(caffe_victim, tmp_path):
    """114 arrays none of which is a GoogLeNet layer: counts and the first names, not a 2.8 kB list."""
    foreign = str(tmp_path / "vgg.mat")
    scipy.io.savemat(foreign, {f"layer_{i:03d}": np.zeros((2, 2), "f4") for i in range(114)})
    message = refused(caffe_victim, foreign)
    assert message == (f"{foreign} is a .mat file of 114 arrays, none named like a BVLC GoogLeNet layer of the "
                       "official HDML code's tf_ckpt_from_caffe.mat (it holds layer_000, layer_001, layer_002, "
                       "layer_003 and 110 more); it fits no backbone here; nothing was loaded")
    # Mostly right, but a whole block absent: counts plus the first few names.
    path_arrays = make_published_mat_arrays()
    partial = str(tmp_path / "partial.mat")
    scipy.io.savemat(partial, {k: v for k, v in path_arrays.items() if not k.startswith("inception_5")})
    message = refused(caffe_victim, partial)
    assert "missing 24: inception_5a/" in message and "and 20 more" in message and len(message) < 400


@pytest.mark.parametrize("case", ["empty", "inside_header", "header_only", "mid_data", "not_mat", "nan"])
def test_damaged_mat_is_one_line_and_changes_nothing(caffe_file, caffe_victim, tmp_path, case):
    path, arrays = caffe_file
    raw = open(path, "rb").read()
    bad = tmp_path / "tf_ckpt_from_caffe.mat"
    content = {"empty": b"", "inside_header": raw[:50], "header_only": raw[:128], "mid_data": raw[: len(raw) // 2],
               "not_mat": b"<html>404 Not Found</html>"}
    if case == "nan":
        damaged = dict(arrays)
        damaged["inception_4e/pool_proj"] = arrays["inception_4e/pool_proj"].copy()
        damaged["inception_4e/pool_proj"][0, 0, 0, 0] = np.nan
        scipy.io.savemat(str(bad), damaged)
    else:
        bad.write_bytes(content[case])
    message = refused(caffe_victim, str(bad))
    expected = {
        "empty": f"{bad} is empty (0 bytes), not a weights file",
        "inside_header": f"{bad} is a truncated .mat file: 50 bytes, shorter than its 128-byte header",
        "header_only": f"{bad} is a .mat file with no arrays (128 bytes): truncated after its header",
        "mid_data": f"{bad} is a truncated or damaged .mat file ({len(raw) // 2:,} bytes): scipy could not read",
        "not_mat": f"{bad} is not a .mat file: it does not start with MATLAB's 'MATLAB 5.0 MAT-file' header",
        "nan": f"{bad} is damaged: 1 arrays hold NaN or Inf: inception_4e/pool_proj; nothing was loaded",
    }[case]
    assert message.startswith(expected), message
    assert "TensorFlow checkpoint" not in message


def test_truncated_slim_data_file_changes_no_weight(slim_file, slim_victim, tmp_path):
    """The issue's case: a cut .data file used to overwrite 133 of 228 variables before failing."""
    prefix, arrays = slim_file
    copy = write_checkpoint(arrays, str(tmp_path / "inception_v1.ckpt"))
    data = copy + ".data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    message = refused(slim_victim, copy)
    assert message.startswith(f"{copy}: the checkpoint data is truncated or damaged: reading InceptionV1/")
    assert "nothing was loaded" in message
    # A cut .index: the reader cannot even list the variables.
    index = write_checkpoint(arrays, str(tmp_path / "index_cut.ckpt")) + ".index"
    with open(index, "r+b") as f:
        f.truncate(os.path.getsize(index) // 3)
    assert "is not a readable TensorFlow checkpoint" in refused(slim_victim, index[: -len(".index")])


def test_slim_missing_variable_and_wrong_layout(slim_file, slim_victim, caffe_victim, tmp_path):
    prefix, arrays = slim_file
    short = {k: v for k, v in arrays.items() if k != "InceptionV1/Mixed_4d/Branch_2/Conv2d_0a_1x1/BatchNorm/beta"}
    short_prefix = write_checkpoint(short, str(tmp_path / "short.ckpt"))
    message = refused(slim_victim, short_prefix)
    assert "missing 1: InceptionV1/Mixed_4d/Branch_2/Conv2d_0a_1x1/BatchNorm/beta" in message
    message = refused(caffe_victim, prefix)
    assert "is a TF-Slim InceptionV1 checkpoint, which fits inception_v1_slim, not inception_v1_caffe" in message
    assert "--backbone=inception_v1_slim" in message
    other = write_checkpoint({"resnet_v1_50/conv1/weights": np.zeros((7, 7, 3, 64), "f4")},
                             str(tmp_path / "resnet.ckpt"))
    message = refused(slim_victim, other)
    assert "is a TensorFlow checkpoint of 2 variables with no TF-Slim InceptionV1 variable" in message
    assert "fits no backbone here" in message


def test_keras_files_of_another_backbone_or_truncated(caffe_file, caffe_victim, slim_victim, tmp_path):
    path, _ = caffe_file
    converted = str(tmp_path / "googlenet.weights.h5")
    build_backbone("inception_v1_caffe", SIZE, weights=path).save_weights(converted)
    message = refused(slim_victim, converted)
    assert message == (f"{converted} is a Keras weights file of inception_v1_caffe, not inception_v1_slim: use "
                       "--backbone=inception_v1_caffe (build_backbone('inception_v1_caffe', ...)); nothing was loaded")
    cut = tmp_path / "cut.weights.h5"
    raw = open(converted, "rb").read()
    cut.write_bytes(raw[: len(raw) // 2])
    message = refused(caffe_victim, str(cut))
    assert message.startswith(f"{cut} is not a readable Keras weights file (HDF5): truncated or damaged")


def test_detect_format(slim_file, caffe_file, tmp_path):
    prefix, _ = slim_file
    assert detect_format(prefix) == ("slim", prefix)
    assert detect_format(prefix + ".index") == ("slim", prefix)
    assert detect_format(os.path.dirname(prefix)) == ("slim", prefix)
    assert detect_format(caffe_file[0])[0] == "caffe"
    tiny = tmp_path / "weights.mat"
    tiny.write_bytes(b"MATLAB 5.0")  # a .mat name decides, even without the full header
    assert detect_format(str(tiny)) == ("caffe", str(tiny))
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"not weights at all")
    with pytest.raises(WeightsError, match="is not a readable TensorFlow checkpoint"):
        load_backbone_weights(build_backbone("inception_v1_slim", SIZE), str(garbage))
    with pytest.raises(WeightsError, match="no weights file"):
        detect_format(str(tmp_path / "absent.mat"))
    with pytest.raises(WeightsError, match="unknown weights format"):
        detect_format(caffe_file[0], format="onnx")


# ----------------------------------------------------------------------------------------------------------------
# tools/convert_weights.py
# ----------------------------------------------------------------------------------------------------------------
def test_convert_weights_round_trip(caffe_file, images, tmp_path):
    """The tool turns the published .mat into a .weights.h5 that loads by auto-detection and computes the same
    features; --backbone names the layout as tools/train.py does."""
    path, _ = caffe_file
    out = str(tmp_path / "googlenet.weights.h5")
    summary = "\n".join(load_tool("convert_weights").convert(path, out, image_size=SIZE))
    assert "backbone: inception_v1_caffe" in summary and "114 variables" in summary
    assert "skipped:  5 on purpose" in summary and "fc_embedding" in summary
    assert "identical after reload" in summary

    direct = build_backbone("inception_v1_caffe", SIZE, weights=path)
    converted = build_backbone("inception_v1_caffe", SIZE, weights=out)
    assert converted.weights_report.format == "keras"
    np.testing.assert_array_equal(np.asarray(converted(images)), np.asarray(direct(images)))
    with pytest.raises(WeightsError, match="fits inception_v1_caffe, not inception_v1_slim"):
        load_tool("convert_weights").convert(path, str(tmp_path / "x.weights.h5"), backbone="inception_v1_slim")


def test_convert_weights_cli_error_is_one_line_exit_2(caffe_file, tmp_path):
    tool = os.path.join(REPO, "tools", "convert_weights.py")
    cut = tmp_path / "cut.mat"
    cut.write_bytes(open(caffe_file[0], "rb").read()[:50])
    failed = subprocess.run([sys.executable, tool, f"--input={cut}", f"--output={tmp_path / 'out.weights.h5'}",
                             "--backbone=inception_v1_caffe"], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == (
        f"error: {cut} is a truncated .mat file: 50 bytes, shorter than its 128-byte header")
    assert "Traceback" not in failed.stderr and failed.stdout == ""
    bad_flag = subprocess.run([sys.executable, tool, "--input=x.mat", "--backbone=resnet50"], capture_output=True,
                              text=True, timeout=300)
    assert bad_flag.returncode == 2
    assert bad_flag.stderr.strip().splitlines() == [
        "error: flag --backbone=resnet50: value should be one of <auto|inception_v1_caffe|inception_v1_slim>"]
