"""Loading ImageNet weights: a TF-Slim checkpoint and a Caffe .mat written here with the exact published names.

The name and shape tables below are transcribed independently of hdml_tf (from TF-Slim's nets/inception_v1.py and the
official HDML lib/GoogleNet_Model.py), and the reference forward passes are plain tf.nn ops over the same arrays,
following the official code's order of operations.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import tensorflow as tf

from conftest import load_tool
from hdml_tf.backbones import build_backbone, detect_format, load_backbone_weights
from hdml_tf.errors import WeightsError

# Keras' own save_weights calls np.array on variables, which NumPy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
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


def make_slim_arrays(seed=1):
    """{checkpoint name: array} of the released inception_v1.ckpt (plus its classifier and global_step)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, k, cin, cout in conv_table("slim"):
        scope = f"InceptionV1/{name}"
        arrays[f"{scope}/weights"] = rng.normal(0, np.sqrt(2.0 / (k * k * cin)), (k, k, cin, cout)).astype("f4")
        arrays[f"{scope}/BatchNorm/beta"] = rng.normal(0, 0.1, cout).astype("f4")
        arrays[f"{scope}/BatchNorm/moving_mean"] = rng.normal(0, 0.1, cout).astype("f4")
        arrays[f"{scope}/BatchNorm/moving_variance"] = rng.uniform(0.5, 1.5, cout).astype("f4")
    arrays["InceptionV1/Logits/Conv2d_0c_1x1/weights"] = rng.normal(0, 0.01, (1, 1, 1024, 1001)).astype("f4")
    arrays["InceptionV1/Logits/Conv2d_0c_1x1/biases"] = np.zeros(1001, "f4")
    return arrays


def make_caffe_arrays(seed=2):
    """{.mat key: array} as the official code reads it: kernels (out, in, h, w), biases under '<name>_bias'."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, k, cin, cout in conv_table("caffe"):
        arrays[name] = rng.normal(0, np.sqrt(2.0 / (k * k * cin)), (cout, cin, k, k)).astype("f4")
        arrays[f"{name}_bias"] = rng.normal(0, 0.1, cout).astype("f4")
    for key, shape in [("loss1/conv", (128, 512, 1, 1)), ("loss1/fc", (1024, 2048)), ("loss1/classifier", (1000, 1024)),
                       ("loss2/conv", (128, 528, 1, 1)), ("loss3/classifier", (1000, 1024))]:
        arrays[key] = np.zeros(shape, "f4")
        arrays[f"{key}_bias"] = np.zeros(shape[0], "f4")
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
    arrays = make_caffe_arrays()
    path = str(tmp_path_factory.mktemp("caffe") / "tf_ckpt_from_caffe.mat")
    scipy.io.savemat(path, arrays)
    return path, arrays


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")


# ----------------------------------------------------------------------------------------------------------------
# Reference forward passes in plain tf.nn ops
# ----------------------------------------------------------------------------------------------------------------
def ref_slim_conv(x, a, name, stride=1):
    scope = f"InceptionV1/{name}"
    y = tf.nn.conv2d(x, a[f"{scope}/weights"], stride, "SAME")
    y = (y - a[f"{scope}/BatchNorm/moving_mean"]) / np.sqrt(a[f"{scope}/BatchNorm/moving_variance"] + 1e-3)
    return tf.nn.relu(y + a[f"{scope}/BatchNorm/beta"])


def ref_slim(images, a):
    """TF-Slim inception_v1_base at inference: returns (stem output, Mixed_3b, pooled [B, 1024])."""
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
            x = tf.nn.max_pool2d(x, 2, 2, "SAME")
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


def ref_caffe_pool(x, pad=True):
    if pad:
        x = tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])
    return tf.nn.max_pool2d(x, 3, 2, "VALID")


def ref_caffe(images, a, radius=5, alpha=1e-4):
    """The official GoogleNet_Model.forward: returns (stem output, inception_3a, pooled [B, 1024])."""
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
            x = ref_caffe_pool(x)
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


# ----------------------------------------------------------------------------------------------------------------
# Tests
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


def test_caffe_mat_lands_by_name_and_matches_official_forward(caffe_file, images):
    path, arrays = caffe_file
    model = build_backbone("inception_v1_caffe", SIZE, weights=path)
    report = model.weights_report
    assert report.format == "caffe" and report.assigned == len(model.weights) == 57 * 2
    assert report.values == sum(arrays[n].size + arrays[n + "_bias"].size for n, _, _, _ in conv_table("caffe"))
    assert all(s.startswith(("loss1/", "loss2/", "loss3/")) for s in report.skipped) and len(report.skipped) == 10
    for name, _, _, _ in conv_table("caffe"):
        layer = model.get_layer(name.replace("/", "."))
        np.testing.assert_array_equal(layer.kernel.numpy(), np.transpose(arrays[name], (2, 3, 1, 0)))
        np.testing.assert_array_equal(layer.bias.numpy(), arrays[name + "_bias"].reshape(-1))

    stem, block, pooled = taps(model, ["pool2.3x3_s2", "inception_3a.output"])(images)
    ref_stem, ref_block, ref_pooled = ref_caffe(tf.constant(images), arrays)
    assert_close(stem, ref_stem)
    assert_close(block, ref_block)
    assert_close(pooled, ref_pooled)

    # Caffe's own LRN is a different network on the same weights; it too matches the reference with radius 2.
    caffe_lrn = build_backbone("inception_v1_caffe", SIZE, weights=path, caffe_lrn=True)
    other = caffe_lrn(images)
    assert_close(other, ref_caffe(tf.constant(images), arrays, radius=2, alpha=2e-5)[2])
    assert not np.allclose(other, pooled, rtol=1e-3)


def test_mismatches_stop_the_load_with_one_error_listing_all(caffe_file, tmp_path):
    path, arrays = caffe_file
    bad = dict(arrays)
    del bad["inception_4c/3x3_reduce"]                                  # missing
    bad["inception_9z/1x1"] = np.zeros((4, 4, 1, 1), "f4")              # unexpected
    bad["inception_3a/5x5"] = np.zeros((32, 16, 3, 3), "f4")            # mis-shaped (a 3x3 where Caffe has 5x5)
    bad_path = str(tmp_path / "bad.mat")
    scipy.io.savemat(bad_path, bad)
    model = build_backbone("inception_v1_caffe", SIZE)
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(WeightsError) as info:
        load_backbone_weights(model, bad_path)
    message = str(info.value)
    assert "\n" not in message
    assert "missing 1: inception_4c/3x3_reduce" in message
    assert "unexpected 1: inception_9z/1x1" in message
    assert "mis-shaped 1: inception_3a/5x5 [32, 16, 3, 3] (model wants [5, 5, 16, 32])" in message
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, model.weights))  # nothing written


def test_slim_missing_variable_and_wrong_layout(slim_file, tmp_path):
    prefix, arrays = slim_file
    short = {k: v for k, v in arrays.items() if k != "InceptionV1/Mixed_4d/Branch_2/Conv2d_0a_1x1/BatchNorm/beta"}
    short_prefix = write_checkpoint(short, str(tmp_path / "short.ckpt"))
    with pytest.raises(WeightsError, match=r"missing 1: InceptionV1/Mixed_4d/Branch_2/Conv2d_0a_1x1/BatchNorm/beta"):
        load_backbone_weights(build_backbone("inception_v1_slim", SIZE), short_prefix + ".index")
    with pytest.raises(WeightsError, match="fits inception_v1_slim, not inception_v1_caffe"):
        load_backbone_weights(build_backbone("inception_v1_caffe", SIZE), prefix)


def test_detect_format(slim_file, caffe_file, tmp_path):
    prefix, _ = slim_file
    assert detect_format(prefix) == ("slim", prefix)
    assert detect_format(prefix + ".index") == ("slim", prefix)
    assert detect_format(os.path.dirname(prefix)) == ("slim", prefix)
    assert detect_format(caffe_file[0])[0] == "caffe"
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"not weights at all")
    with pytest.raises(WeightsError, match="cannot read .* as a TensorFlow checkpoint"):
        load_backbone_weights(build_backbone("inception_v1_slim", SIZE), str(garbage))
    with pytest.raises(WeightsError, match="no weights file"):
        detect_format(str(tmp_path / "absent.mat"))
    with pytest.raises(WeightsError, match="unknown weights format"):
        detect_format(caffe_file[0], format="onnx")


def test_convert_weights_round_trip(caffe_file, images, tmp_path):
    """The tool turns the .mat into a .weights.h5 that loads by auto-detection and computes the same features."""
    path, _ = caffe_file
    out = str(tmp_path / "googlenet.weights.h5")
    summary = "\n".join(load_tool("convert_weights").convert(path, out, image_size=SIZE))
    assert "backbone: inception_v1_caffe" in summary and "114 variables" in summary
    assert "identical after reload" in summary

    direct = build_backbone("inception_v1_caffe", SIZE, weights=path)
    converted = build_backbone("inception_v1_caffe", SIZE, weights=out)
    assert converted.weights_report.format == "keras"
    np.testing.assert_array_equal(np.asarray(converted(images)), np.asarray(direct(images)))
    # A converted file of one layout does not load into the other.
    with pytest.raises(WeightsError, match="not a Keras weights file of inception_v1_slim"):
        load_backbone_weights(build_backbone("inception_v1_slim", SIZE), out)


def test_convert_weights_cli_error_is_one_line_exit_2(tmp_path):
    tool = os.path.join(REPO, "tools", "convert_weights.py")
    failed = subprocess.run([sys.executable, tool, f"--input={tmp_path / 'absent.mat'}",
                             f"--output={tmp_path / 'out.weights.h5'}"], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith("error: no weights file at ")
    assert "Traceback" not in failed.stderr and failed.stdout == ""
    bad_flag = subprocess.run([sys.executable, tool, "--input=x.mat", "--format=onnx"], capture_output=True,
                              text=True, timeout=300)
    assert bad_flag.returncode == 2
    assert bad_flag.stderr.strip().splitlines() == [
        "error: flag --format=onnx: value should be one of <auto|slim|caffe>"]
