"""SavedModel export (checked in a fresh process that imports only TensorFlow), `.keras` save/load that resumes
training, and tools/export.py.

Tolerance: the reloaded SavedModel runs the same graph on the same CPU kernels as the in-process model; embeddings
must agree to 1e-5 absolute (measured: at most 6e-8 on x86-64 CPU, one float32 rounding of the L2 normalization).
JPEG decoding is TensorFlow's decoder on both sides.
"""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import layout_batch, load_tool, tiny_backbone
from hdml_tf import rundir, serving
from hdml_tf.config import HDMLConfig
from hdml_tf.data.image_set import ImageSet
from hdml_tf.data.images import Augment
from hdml_tf.data.pipeline import make_eval_dataset
from hdml_tf.errors import HDMLError
from hdml_tf.model import HDMLModel

TOL = 1e-5
SIZE, RESIZE, EMB = 16, 20, 8
ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: TensorFlow and NumPy only.
LOADER = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
import numpy as np
import tensorflow as tf
export_dir, inputs, outputs = sys.argv[1:4]
x = dict(np.load(inputs))
m = tf.saved_model.load(export_dir)
sig = m.signatures
out = {
    "default_float": sig["serving_default"](images=tf.constant(x["float"]))["embeddings"],
    "images_float": sig["embed_images"](images=tf.constant(x["float"]))["embeddings"],
    "images_uint8": sig["embed_images_uint8"](images=tf.constant(x["uint8"]))["embeddings"],
    "uint8_as_float": sig["serving_default"](images=tf.constant(x["uint8"].astype(np.float32)))["embeddings"],
    "other_size": sig["embed_images_uint8"](images=tf.constant(x["other_size"]))["embeddings"],
    "gray": sig["embed_images_uint8"](images=tf.constant(x["gray"]))["embeddings"],
    "rgba": sig["embed_images_uint8"](images=tf.constant(x["rgba"]))["embeddings"],
    "bytes": sig["embed_bytes"](image_bytes=tf.constant(list(x["encoded"])))["embeddings"],
    "python_uint8": m.embed_images(tf.constant(x["uint8"]))["embeddings"],
    "python_bytes": m.embed_bytes(tf.constant(list(x["encoded"])))["embeddings"],
}
meta = {k: v.numpy() for k, v in m.metadata().items()}
out = {k: v.numpy() for k, v in out.items()}
out["meta_embedding_size"] = meta["embedding_size"]
out["meta_image_size"] = meta["image_size"]
out["meta_resize"] = meta["resize"]
out["meta_backbone"] = meta["backbone"].decode()
out["num_variables"] = len(m.embedding_variables)
out["signature_names"] = sorted(sig.keys())
out["imported_hdml_tf"] = any(k.split(".")[0] == "hdml_tf" for k in sys.modules)
np.savez(outputs, **out)
"""


def _model(hdml=True, num_classes=4, seed=0):
    model = HDMLModel(tiny_backbone(SIZE, seed=seed), num_classes=num_classes,
                      config=HDMLConfig(embedding_size=EMB, window=2, hdml=hdml))
    return model


def _batch(seed=0):
    return layout_batch("npair", tuples=4, size=SIZE, seed=seed, num_classes=4)


def _compile(model):
    # Eager steps: tracing HDML's train_step costs more than three tiny steps (2 shared CPU cores).
    model.compile(metric_optimizer=keras.optimizers.Adam(1e-3), generator_optimizer=keras.optimizers.Adam(2e-2),
                  classifier_optimizer=keras.optimizers.Adam(3e-3), run_eagerly=True)
    return model


@pytest.fixture(scope="module")
def trained():
    """An HDMLModel after 3 steps: BatchNorm statistics moved, J_avg's window (2) closed once."""
    model = _compile(_model())
    images, labels = _batch()
    for _ in range(3):
        model.train_on_batch(images, labels)
    return model


def _reference(model, images):
    """The in-process model on images prepared by the evaluation geometry."""
    return model(serving.preprocess_images(images, SIZE, RESIZE), training=False).numpy()


def _encoded_images():
    """Real JPEG / PNG files of different sizes and color modes, and what TensorFlow decodes from them."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (30, 25, 3), dtype=np.uint8)
    rgb2 = rng.integers(0, 256, (18, 40, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (22, 22, 1), dtype=np.uint8)
    rgba = rng.integers(0, 256, (26, 17, 4), dtype=np.uint8)
    encoded = [tf.io.encode_jpeg(rgb, quality=90).numpy(), tf.io.encode_png(rgb2).numpy(),
               tf.io.encode_png(gray).numpy(), tf.io.encode_png(rgba).numpy()]
    assert encoded[0][:3] == b"\xff\xd8\xff" and encoded[1][:4] == b"\x89PNG"
    return encoded


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """Exports `trained`, runs every signature in a subprocess, keeps the in-process references of that moment."""
    tmp = tmp_path_factory.mktemp("export")
    result = serving.export_saved_model(trained, str(tmp / "saved"), resize=RESIZE, backbone="tiny")
    rng = np.random.default_rng(1)
    inputs = {
        "float": rng.uniform(0, 255, (3, 23, 29, 3)).astype(np.float32),
        "uint8": rng.integers(0, 256, (2, 40, 31, 3), dtype=np.uint8),
        "other_size": rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8),  # upsampled to RESIZE
        "gray": rng.integers(0, 256, (2, 19, 21, 1), dtype=np.uint8),
        "rgba": rng.integers(0, 256, (2, 21, 19, 4), dtype=np.uint8),
        "encoded": np.array(_encoded_images(), dtype=object),
    }
    decoded = [tf.io.decode_image(b, channels=3, expand_animations=False).numpy()[None] for b in inputs["encoded"]]
    expected = {
        "float": _reference(trained, inputs["float"]),
        "uint8": _reference(trained, inputs["uint8"]),
        "other_size": _reference(trained, inputs["other_size"]),
        "gray": _reference(trained, np.repeat(inputs["gray"], 3, axis=-1)),
        "rgba": _reference(trained, inputs["rgba"][..., :3]),
        "bytes": np.concatenate([_reference(trained, d) for d in decoded]),
    }
    np.savez(tmp / "inputs.npz", **{k: (v if k != "encoded" else np.array(list(v), dtype=bytes))
                                    for k, v in inputs.items()})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", LOADER, str(tmp / "saved"), str(tmp / "inputs.npz"),
                           str(tmp / "outputs.npz")], capture_output=True, text=True, timeout=120, env=env,
                          cwd=str(tmp))
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp / "outputs.npz") as f:
        got = {k: f[k] for k in f.files}
    return {"result": result, "got": got, "expected": expected, "dir": tmp / "saved",
            "embedder_variables": trained.embedder().variables}


def test_saved_model_loads_without_hdml_tf_and_matches_in_process(exported):
    got, expected = exported["got"], exported["expected"]
    assert not got["imported_hdml_tf"]
    assert list(got["signature_names"]) == ["embed_bytes", "embed_images", "embed_images_uint8", "serving_default"]
    for key in ("default_float", "images_float"):
        np.testing.assert_allclose(got[key], expected["float"], atol=TOL, rtol=0)
    for key in ("images_uint8", "uint8_as_float", "python_uint8"):
        np.testing.assert_allclose(got[key], expected["uint8"], atol=TOL, rtol=0)
    # uint8 and float32 copies of the same pixels give the same embeddings.
    np.testing.assert_allclose(got["images_uint8"], got["uint8_as_float"], atol=TOL, rtol=0)
    for key in ("other_size", "gray", "rgba"):
        np.testing.assert_allclose(got[key], expected[key], atol=TOL, rtol=0)
    for key in ("default_float", "images_uint8", "bytes"):
        assert got[key].dtype == np.float32 and got[key].shape[1] == EMB
        np.testing.assert_allclose(np.linalg.norm(got[key], axis=1), 1.0, atol=1e-5)


def test_bytes_signature_on_real_jpeg_and_png(exported):
    got, expected = exported["got"], exported["expected"]
    assert got["bytes"].shape == (4, EMB)  # JPEG, PNG RGB, PNG gray, PNG RGBA of four sizes in one batch
    np.testing.assert_allclose(got["bytes"], expected["bytes"], atol=TOL, rtol=0)
    np.testing.assert_allclose(got["python_bytes"], expected["bytes"], atol=TOL, rtol=0)


def test_metadata_and_embedding_network_only(exported):
    got, result = exported["got"], exported["result"]
    assert (int(got["meta_embedding_size"]), int(got["meta_image_size"]), int(got["meta_resize"])) == (EMB, SIZE,
                                                                                                     RESIZE)
    assert str(got["meta_backbone"]) == "tiny"
    info = serving.read_export_info(str(exported["dir"]))
    assert info == result.info and info.hdml_tf_version
    # Only the embedder's variables (backbone + metric head): no generator, no classifier.
    assert int(got["num_variables"]) == len(exported["embedder_variables"])
    saved = tf.train.list_variables(str(exported["dir"] / "variables" / "variables"))
    size = sum(int(np.prod(shape)) for name, shape in saved if "OBJECT_GRAPH" not in name)
    assert size == sum(int(np.prod(v.shape)) for v in exported["embedder_variables"])


def test_preprocessing_is_the_evaluation_pipeline(tmp_path):
    """preprocess_bytes on a file == make_eval_dataset's image of that file (resize, center crop)."""
    rng = np.random.default_rng(5)
    paths = []
    for i, shape in enumerate([(30, 25, 3), (17, 41, 3)]):
        path = tmp_path / f"{i}.png"
        path.write_bytes(tf.io.encode_png(rng.integers(0, 256, shape, dtype=np.uint8)).numpy())
        paths.append(str(path))
    image_set = ImageSet(labels=np.array([0, 1]), class_names=["a", "b"], paths=paths, name="t")
    ds = make_eval_dataset(image_set, 2, Augment(resize=RESIZE, crop=SIZE, flip=False), verbose=0)
    pipeline_images = next(iter(ds))[0].numpy()
    ours = serving.preprocess_bytes(tf.constant([open(p, "rb").read() for p in paths]), SIZE, RESIZE).numpy()
    np.testing.assert_array_equal(ours, pipeline_images)


def test_export_errors(trained, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(HDMLError, match="not empty and holds no SavedModel"):
        serving.export_saved_model(trained, str(tmp_path / "busy"))
    with pytest.raises(HDMLError, match="image_size=24 does not match"):
        serving.export_saved_model(trained, str(tmp_path / "a"), 24)
    with pytest.raises(HDMLError, match="resize=12 must be >= image_size=16"):
        serving.export_saved_model(trained, str(tmp_path / "a"), resize=12)
    with pytest.raises(HDMLError, match="cannot export a str"):
        serving.export_saved_model("model.keras", str(tmp_path / "a"))
    # The one geometry rule (hdml_tf.data.datasets): photo crops keep the official 256/227 (256/224) proportion.
    assert serving.default_resize(227, "inception_v1_caffe") == 256 and serving.default_resize(224) == 256
    assert serving.default_resize(64, "inception_v1_caffe") == round(64 * 256 / 227) == 72


def test_keras_round_trip_resumes_training(trained, tmp_path):
    path = rundir.save_keras(trained, str(tmp_path / "model.keras"), resize=RESIZE, backbone="tiny")
    j_avg_saved = trained.j_avg.value.numpy()
    loaded = rundir.load_keras(path)
    assert isinstance(loaded, HDMLModel) and loaded.config == trained.config
    assert loaded.backbone.backbone_name == "tiny" and rundir.keras_embedding_info(loaded).resize == RESIZE
    assert [v.path for v in loaded.weights] == [v.path for v in trained.weights]
    for a, b in zip(trained.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for running in ("j_avg", "j_gen_avg"):
        for var in ("value", "total", "count"):
            assert getattr(getattr(loaded, running), var).numpy() == getattr(getattr(trained, running), var).numpy()
    assert trained.j_avg.value.numpy() != 1e6  # the window closed, so this compares a trained value
    for name in ("optimizer", "generator_optimizer", "classifier_optimizer"):
        a, b = getattr(trained, name), getattr(loaded, name)
        assert type(a) is type(b) and float(a.learning_rate) == pytest.approx(float(b.learning_rate))
        assert int(b.iterations.numpy()) == int(a.iterations.numpy()) == 3
        for x, y in zip(a.variables, b.variables):
            np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=f"{name} {x.path}")
    # One more step: the same losses and the same weights afterwards.
    loaded.run_eagerly = True  # as `trained` (speed only)
    images, labels = _batch(seed=7)
    logs_loaded = loaded.train_on_batch(images, labels, return_dict=True)
    logs_trained = trained.train_on_batch(images, labels, return_dict=True)
    for key in ("loss", "j_gen", "j_ce", "j_avg"):
        assert logs_loaded[key] == pytest.approx(logs_trained[key], rel=1e-5), key
    for a, b in zip(trained.trainable_weights, loaded.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert int(loaded.optimizer.iterations.numpy()) == 4
    # Plain Keras loading works too (uncompiled: HDMLModel's compile takes three optimizers by name).
    plain = keras.models.load_model(path, compile=False)
    assert plain.j_avg.value.numpy() == j_avg_saved


def test_keras_uncompiled_baseline_and_errors(tmp_path):
    model = _model(hdml=False, num_classes=3, seed=1)
    path = rundir.save_keras(model, str(tmp_path / "base.keras"))
    loaded = rundir.load_keras(path)
    assert loaded.generator_net is None and getattr(loaded, "optimizer", None) is None
    images = _batch()[0][:2]
    np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), atol=1e-6)
    with pytest.raises(HDMLError, match="must end with .keras"):
        rundir.save_keras(model, str(tmp_path / "x.h5"))
    with pytest.raises(HDMLError, match="not found"):
        rundir.load_keras(str(tmp_path / "absent.keras"))
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    with pytest.raises(HDMLError, match="not a readable .keras file"):
        rundir.load_keras(str(tmp_path / "bad.keras"))


# ------------------------------------------------------------------------------------------------ tools/export.py
def test_export_tool_from_training_run_dir(trained, tmp_path, monkeypatch):
    """A run directory as tools/train.py writes it (results.json + hdml.weights.h5); the backbone is faked tiny."""
    import hdml_tf.backbones as backbones
    size = 32  # the training tool's smallest crop

    def fake_build(name, image_size, weights=None, **_):
        net = tiny_backbone(image_size, seed=2)
        net.backbone_name = name
        return net

    monkeypatch.setattr(backbones, "build_backbone", fake_build)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = HDMLConfig(embedding_size=EMB, window=2)
    model = HDMLModel(fake_build("inception_v1_slim", size), num_classes=5, config=cfg)
    model(np.zeros((1, size, size, 3), np.float32))
    model.save_weights(str(run_dir / "hdml.weights.h5"))
    (run_dir / "results.json").write_text(json.dumps({
        "run": {"dataset": "glyphs", "backbone": "inception_v1_slim", "image_size": size, "resize": 36},
        "method": dataclasses.asdict(cfg)}))
    tool = load_tool("export")
    lines = tool.export(str(run_dir), str(tmp_path / "saved"))
    assert any("max |diff|" in line for line in lines)
    info = serving.read_export_info(str(tmp_path / "saved"))
    assert (info.backbone, info.image_size, info.resize, info.embedding_size) == ("inception_v1_slim", size, 36, EMB)
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    images = np.random.default_rng(0).integers(0, 256, (2, 36, 36, 3), dtype=np.uint8)
    want = model(serving.preprocess_images(images, size, 36), training=False).numpy()
    np.testing.assert_allclose(loaded.embed_images(tf.constant(images))["embeddings"].numpy(), want, atol=TOL)
    with pytest.raises(HDMLError, match="already holds a SavedModel"):
        tool.export(str(run_dir), str(tmp_path / "saved"))
    with pytest.raises(HDMLError, match="does not fit"):
        tool.export(str(run_dir / "hdml.weights.h5"), str(tmp_path / "other"), embedding_size=EMB + 1)
    # A lone weights file: backbone and size from flags, the embedding size read from the file.
    (tmp_path / "lone").mkdir()
    os.replace(run_dir / "hdml.weights.h5", tmp_path / "lone" / "w.weights.h5")
    with pytest.raises(HDMLError, match="no results.json beside it; pass --backbone"):
        tool.export(str(tmp_path / "lone" / "w.weights.h5"), str(tmp_path / "lone_saved"))
    tool.export(str(tmp_path / "lone" / "w.weights.h5"), str(tmp_path / "lone_saved"), image_size=size,
                backbone="inception_v1_slim", verify=False)
    info = serving.read_export_info(str(tmp_path / "lone_saved"))
    # Without a run, the photo geometry rule: the official 256/224 proportion for the slim layout.
    assert (info.embedding_size, info.image_size, info.resize) == (EMB, size, round(size * 256 / 224))
    with pytest.raises(HDMLError, match="no .keras or .weights.h5 file"):
        tool.export(str(tmp_path / "saved" / "variables"), str(tmp_path / "x"))
    # A .keras checkpoint carries everything itself.
    keras_path = rundir.save_keras(trained, str(tmp_path / "m.keras"), resize=RESIZE)
    tool.export(keras_path, str(tmp_path / "from_keras"), verify=False)
    assert serving.read_export_info(str(tmp_path / "from_keras")).resize == RESIZE


def test_export_tool_errors_are_one_line():
    tool = str(ROOT / "tools" / "export.py")
    done = subprocess.run([sys.executable, tool, "--checkpoint=/nonexistent/run", "--output=/tmp/x"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: checkpoint /nonexistent/run not found; expected a training run directory, a .keras or a "
        ".weights.h5 file"]
