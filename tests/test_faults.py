"""Fault injection: damaged checkpoints, a full disk, SIGKILL while saving, NaN batches; and the causes of NaN.

Each fault must end with no work lost beyond the last complete checkpoint and a message that says what happened.
(SIGKILL of a real training process, mid-epoch and mid-save, is in test_resume.py.)
"""
import errno
import json
import logging
import os
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf

import resume_driver
from conftest import layout_batch, tiny_backbone
from hdml_tf import checkpointing, experiment, hardness
from hdml_tf.callbacks import TrainingDiverged
from hdml_tf.checkpointing import MANIFEST, CheckpointError, CheckpointManager
from hdml_tf.config import ConfigError, HDMLConfig
from hdml_tf.model import HDMLModel

N = 4  # N-pair tuples per batch: B = 8 images of 16 px


@pytest.fixture(scope="module")
def model():
    """One HDML model for the whole module: its train step is traced once (skipped steps never change it)."""
    m = HDMLModel(tiny_backbone(), num_classes=2 * N, config=HDMLConfig(embedding_size=8, window=2))
    m.compile(metric_optimizer=keras.optimizers.Adam(1e-3), generator_optimizer=keras.optimizers.Adam(1e-2),
              classifier_optimizer=keras.optimizers.Adam(1e-3))
    return m


def _batch(step):
    return layout_batch("npair", tuples=N, size=16, seed=step, num_classes=2 * N)


def _saved(directory, model, steps=(2, 4)):
    """A manager with a checkpoint per step; j_avg's value marks which checkpoint was restored."""
    manager = CheckpointManager(directory, keep=3)
    for step in steps:
        model.j_avg.value.assign(float(step))
        assert manager.save(model, step) is not None
    return manager


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


# ------------------------------------------------------------------------------------------- damaged checkpoints
@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "flipped byte, no manifest"])
def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, model, caplog, damage):
    manager = _saved(tmp_path, model)
    newest = tmp_path / "ckpt-00000004.npz"
    data = bytearray(newest.read_bytes())
    if damage.startswith("flipped"):
        data[len(data) // 2] ^= 0xFF  # inside some variable's bytes: the SHA-256, or without it the CRC-32
    else:
        data = data[: len(data) // 2]  # a write that never finished
    newest.write_bytes(bytes(data))
    if "no manifest" in damage:
        (tmp_path / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="hdml_tf.checkpointing"):
        assert manager.restore(model) == 2
    assert float(model.j_avg.value.numpy()) == 2.0
    assert "ckpt-00000004.npz (step 4) is unreadable" in caplog.text
    assert "moved it to ckpt-00000004.npz.corrupt and falling back to step 2" in caplog.text
    # Training goes on from step 2; the next checkpoints replace the damaged one in the manifest.
    assert manager.save(model, 4) is not None
    assert [c.step for c in manager.checkpoints()] == [2, 4] and manager.restore(model) == 4


def test_no_readable_checkpoint_is_a_clear_error(tmp_path, model):
    manager = _saved(tmp_path, model)
    for p in tmp_path.glob("ckpt-*.npz"):
        p.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*ckpt-00000004.npz: .*move the directory "
                                              r"away to start from scratch"):
        manager.restore(model)


def test_unreadable_manifest_uses_the_checkpoint_files(tmp_path, model, caplog):
    manager = _saved(tmp_path, model)
    (tmp_path / MANIFEST).write_text('{"format": "hdml_tf-checkpoint-1", "checkpoints": [{"st')
    with caplog.at_level(logging.WARNING, logger="hdml_tf.checkpointing"):
        assert manager.restore(model) == 4
    assert "manifest" in caplog.text and "unreadable" in caplog.text


def test_checkpoint_of_another_model_is_an_error_not_a_fallback(tmp_path, model):
    manager = _saved(tmp_path, model)
    baseline = HDMLModel(tiny_backbone(), num_classes=2 * N, config=HDMLConfig(embedding_size=8, hdml=False))
    baseline.compile()
    with pytest.raises(CheckpointError, match="HDML vs baseline"):
        manager.restore(baseline)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000002.npz", "ckpt-00000004.npz"]


# ------------------------------------------------------------------------------------------- failed or killed saves
def test_full_disk_during_a_save_loses_nothing(tmp_path, model, monkeypatch, caplog):
    manager = _saved(tmp_path, model)
    before = _files(tmp_path)

    def disk_full(path, *args):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpointing, "write_npz", disk_full)
    with caplog.at_level(logging.ERROR, logger="hdml_tf.checkpointing"):
        assert manager.save(model, 6) is None
    assert ("could not write the checkpoint of step 6" in caplog.text and "the disk is full" in caplog.text
            and "the previous checkpoint (step 4) is intact" in caplog.text)
    assert _files(tmp_path) == before  # no temporary file left, manifest and checkpoints untouched
    assert manager.restore(model) == 4

    # The disk fills up between the data file and the manifest: the published file is complete and counts.
    monkeypatch.undo()
    monkeypatch.setattr(checkpointing, "write_text", disk_full)
    assert manager.save(model, 6) is None
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert json.loads((tmp_path / MANIFEST).read_text())["latest"] == 4
    assert manager.restore(model) == 6


def test_partial_file_of_a_killed_save_is_ignored_and_removed(tmp_path, model, caplog):
    manager = _saved(tmp_path, model)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs: the writer was SIGKILLed while saving step 6
    partial = tmp_path / f".ckpt-00000006.npz.tmp-{dead.pid}"
    partial.write_bytes(b"PK\x03\x04 half a checkpoint")
    live = tmp_path / f".ckpt-00000006.npz.tmp-{os.getpid()}"  # a save in progress in a live process
    live.write_bytes(b"PK")
    with caplog.at_level(logging.WARNING, logger="hdml_tf.checkpointing"):
        assert manager.restore(model) == 4
    assert not partial.exists() and live.exists()
    assert "removed 1 partial checkpoint file(s) left by an interrupted save" in caplog.text


# ------------------------------------------------------------------------------------------- NaN during training
def test_nan_batches_are_skipped_logged_and_stop_training_after_k_in_a_row(tmp_path, model, caplog):
    """Step 2 has a NaN pixel (skipped, logged, training goes on); steps 5, 6, 7 too: with max_bad_steps=3 training
    stops at step 7 with a clear message, and the newest checkpoint is step 4, the last good state."""
    bad_steps = {2, 5, 6, 7}
    images, labels = zip(*[_batch(step) for step in range(1, 11)])
    images = np.stack(images)
    for step in bad_steps:
        images[step - 1, 0, 3, 3, 0] = np.nan
    ds = tf.data.Dataset.from_tensor_slices((images, np.stack(labels)))
    run, hdml, _ = resume_driver.configs(tmp_path)
    run = experiment.dataclasses.replace(run, max_bad_steps=3, checkpoint_every=2)
    manager = experiment.checkpoint_manager(run, model.config)
    callbacks = experiment.fault_tolerance_callbacks(run, manager, initial_step=0)
    skipped_before = float(model.skipped.numpy())
    try:
        with caplog.at_level(logging.WARNING, logger="hdml_tf.callbacks"):
            with pytest.raises(TrainingDiverged, match=r"3 consecutive steps \(5\.\.7\) had non-finite values "
                                                       r"\(.*grad\(J_metric\).*\) and were not applied; the last "
                                                       r"good checkpoint \(step 4\) in .* is kept"):
                model.fit(ds, epochs=1, steps_per_epoch=10, callbacks=callbacks, verbose=0)
    finally:  # experiment.fit does this: on_train_end does not run when fit raises
        for cb in callbacks:
            getattr(cb, "restore_handlers", lambda: None)()
    assert float(model.skipped.numpy()) - skipped_before == 4
    assert "step 2 skipped: non-finite grad(J_metric)" in caplog.text
    assert "(1 in a row, 1 in this run)" in caplog.text and "(3 in a row, 4 in this run)" in caplog.text
    # Checkpoints: 2 was a bad step (postponed to 3), 4 good, 6 bad (postponed, then the stop): 3 and 4.
    assert [c.step for c in manager.checkpoints()] == [3, 4]
    _, saved = checkpointing.read_checkpoint(manager.directory / "ckpt-00000004.npz")
    for i, v in enumerate(model.variables):
        if "skipped" not in v.path:  # the three skipped steps changed nothing since step 4
            np.testing.assert_array_equal(saved[f"model.{i:04d}"], v.numpy(), err_msg=v.path)


# ------------------------------------------------------------------------------------------- causes of NaN
def _official_pull(anchor, positive, negative, j_avg, alpha=90.0):
    """lib/HDML.py `Pulling` as the official code writes it: unguarded sqrt distances (nn_Ops.distance), a
    division by d⁻ evaluated for every row, and the mask applied by multiplication."""
    def distance(a, b):
        return tf.sqrt(tf.reduce_sum(tf.square(a - b), axis=1, keepdims=True))
    d_pos, d_neg = distance(anchor, positive), distance(anchor, negative)
    pulled = anchor + (negative - anchor) * ((d_pos + (d_neg - d_pos) * tf.exp(-alpha / j_avg)) / d_neg)
    keep = tf.cast(d_pos >= d_neg, tf.float32)
    return negative * keep + pulled * (1.0 - keep)


def test_zero_distances_make_the_official_pulling_nan_but_not_ours():
    """Cause 1: an anchor that coincides with its positive (duplicate images in a class, which SOP and CUB have).
    In the official code this gives NaN in the forward pass where d⁻ = 0 too (the N-pair diagonal, j = i) and,
    where d⁻ > 0, a finite loss with a NaN gradient (sqrt'(0) = inf, times a zero mask) that its NaN-loss guard
    cannot see, so the NaN reaches the weights and then J_m itself. Ours stays finite in value and gradient."""
    anchor = tf.constant([[0.6, 0.8], [1.0, 0.0]])
    positive = tf.constant([[0.6, 0.8], [0.0, 1.0]])  # row 0: anchor == positive (d⁺ = 0)
    far_negative = tf.constant([[-1.0, 0.0], [-1.0, 0.0]])
    for negative, official_value_nan in ((positive, True), (far_negative, False)):  # N-pair diagonal / triplet
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([anchor, positive, negative])
            official = tf.reduce_sum(_official_pull(anchor, positive, negative, 1.0))
            ours = tf.reduce_sum(hardness.pull(anchor, negative, hardness.safe_norm(anchor - positive),
                                               hardness.pull_factor(1.0, 90.0))[0])
        assert bool(np.isnan(official.numpy())) == official_value_nan
        assert np.isnan(tape.gradient(official, anchor).numpy()).any()  # always NaN in the official gradient
        assert np.isfinite(ours.numpy())
        assert all(np.isfinite(g.numpy()).all() for g in tape.gradient(ours, [anchor, positive, negative]))


def test_model_step_is_applied_with_duplicate_images_and_running_means_at_zero(model):
    """Cause 1 through the whole model, and the exponentials: J_gen → 0 makes e^(−β/J_gen) underflow and J_avg (the
    mean of the weighted J_m) follows it to 0; e^(−α/0) = e^(−inf) = 0 in IEEE arithmetic, so these steps are fine."""
    images, labels = _batch(0)
    duplicate = images.copy()
    duplicate[N:] = duplicate[:N]  # every positive is the very same image as its anchor
    cases = [("duplicate anchor/positive images", duplicate, {}),
             ("J_avg = J_gen = 0", images, {"j_avg": 0.0, "j_gen_avg": 0.0}),
             ("denormal running means", images, {"j_avg": 1e-45, "j_gen_avg": 1e-45})]
    for name, batch, means in cases:
        saved = {k: float(getattr(model, k).value.numpy()) for k in ("j_avg", "j_gen_avg")}
        for k, value in means.items():
            getattr(model, k).value.assign(value)
        skipped = float(model.skipped.numpy())
        logs = model.train_on_batch(batch, labels, return_dict=True)
        assert float(model.skipped.numpy()) == skipped, f"{name}: the step was skipped"
        assert not model.nonfinite.numpy().any(), (name, model.nonfinite_names, model.nonfinite.numpy())
        assert all(np.isfinite(v) for v in logs.values()), name
        for k, value in saved.items():
            getattr(model, k).value.assign(value)


def test_finite_loss_with_nan_gradient_is_skipped(model):
    """Cause 2: the official guard replaces a NaN LOSS by 0 but applies NaN GRADIENTS of a finite loss (and Inf
    losses). A NaN pixel does exactly that here: ReLU turns the NaN into 0 forward, not backward."""
    images, labels = _batch(1)
    images[0, 2, 2, 0] = np.nan
    weights = [v.numpy().copy() for v in model.trainable_variables]
    skipped = float(model.skipped.numpy())
    model.train_on_batch(images, labels)
    assert float(model.skipped.numpy()) == skipped + 1
    flagged = [n for n, f in zip(model.nonfinite_names, model.nonfinite.numpy()) if f]
    assert flagged == ["grad(J_metric)"]  # every loss was finite
    assert all(np.array_equal(w, v.numpy()) for w, v in zip(weights, model.trainable_variables))


def test_classifier_smaller_than_the_label_range_is_a_clear_error(model):
    """Cause 3: the official --num_class defaults to Cars' 99; CUB (100 training classes) and SOP (11,318) labels
    beyond it give NaN losses on a GPU (TensorFlow's sparse cross-entropy returns NaN rows there)."""
    train = resume_driver.image_set(classes=3 * N)
    with pytest.raises(ConfigError, match=r"has 12 classes but the model's softmax classifier has 8 outputs"):
        experiment.check_num_classes(model, train)
    experiment.check_num_classes(model, resume_driver.image_set(classes=2 * N))


# ------------------------------------------------------------------------------------------- full disks (issue 14)
def _full_disk_writer(path, data):
    """What a full disk does to a write: part of the bytes land, then ENOSPC."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("artifact", ["weights", "keras", "results", "history", "index"])
def test_a_full_disk_while_writing_an_artifact_is_one_line_and_keeps_the_previous_file(tmp_path, model, monkeypatch,
                                                                                       artifact):
    """Every artifact is written atomically: the previous file stays, byte for byte, no partial or temporary file is
    left, and the error is one line (it used to be three h5py tracebacks and a segmentation fault)."""
    from hdml_tf import atomic, retrieval
    from hdml_tf.rundir import RunDir
    from hdml_tf.serving import EmbeddingInfo
    out = RunDir(tmp_path)
    index = retrieval.ImageIndex(embeddings=np.eye(3, dtype=np.float32), paths=("a", "b", "c"), root="/x",
                                 labels=None, class_names=(), info=EmbeddingInfo(3, 16, 16))
    write = {"weights": lambda: out.save_model(model, "hdml", image_size=16, resize=16, backbone="tiny"),
             "keras": lambda: out.save_model(model, "hdml", image_size=16, resize=16, backbone="tiny"),
             "results": lambda: out.write_results({"test": {"hdml": {"nmi": 0.5}}}),
             "history": lambda: out.write_history("hdml", [{"epoch": 1, "step": 2, "loss": 1.5}]),
             "index": lambda: retrieval.save_index(str(tmp_path / "index.npz"), index)}[artifact]
    target = {"weights": out.weights("hdml"), "keras": out.keras("hdml"), "results": out.results,
              "history": out.history("hdml"), "index": tmp_path / "index.npz"}[artifact]
    write()  # the previous, complete file
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = atomic._write_file
    if artifact == "keras":  # the weights are written first and fit; the .keras file does not
        monkeypatch.setattr(atomic, "_write_file", lambda p, d: (_full_disk_writer if str(p).endswith(".keras")
                                                                 else real)(p, d))
    else:
        monkeypatch.setattr(atomic, "_write_file", _full_disk_writer)
    with pytest.raises(atomic.WriteError) as failed:
        write()
    message = str(failed.value)
    assert "\n" not in message and f"{target}: the disk is full; the previous {target.name} is unchanged" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing partial, nothing left over


def _child(code, limit_bytes=None, timeout=240):
    """Runs Python code in a child process, with a file size limit (RLIMIT_FSIZE: writes past it fail with EFBIG,
    as a full disk fails them with ENOSPC, also inside h5py's C code) when given."""
    import resource
    import signal as signals
    import sys

    def limit():
        signals.signal(signals.SIGXFSZ, signals.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.path.dirname(here),
                                                                     os.environ.get("PYTHONPATH")])),
           "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=limit if limit_bytes else None)


_SAVE_IN_CHILD = """
import sys
from conftest import tiny_backbone
from hdml_tf.config import HDMLConfig
from hdml_tf.errors import HDMLError
from hdml_tf.model import HDMLModel
from hdml_tf.rundir import RunDir
model = HDMLModel(tiny_backbone(32, feature_dim=256), 4, HDMLConfig(embedding_size=64))
model.compile()
try:
    RunDir(sys.argv[1] if len(sys.argv) > 1 else {out!r}).save_model(model, "hdml", image_size=32, resize=32,
                                                                    backbone="tiny")
except HDMLError as e:
    print(f"error: {{e}}", file=sys.stderr)
    sys.exit(2)
print("saved")
"""


def _assert_clean_failure(result, out):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])  # not -11: no segmentation fault
    assert "Traceback" not in result.stderr and "h5py" not in result.stderr, result.stderr[-3000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert not (out / "hdml.weights.h5").exists() and not (out / "hdml.keras").exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    return errors[0]


def test_a_write_past_the_file_size_limit_in_a_real_process_is_one_line_not_a_crash(tmp_path):
    """A real failing write inside a real process (no patched Python): the process may write 200 kB per file and
    the weights are ~1.4 MB. h5py used to print its errors from C and crash the interpreter at exit."""
    out = tmp_path / "out"
    out.mkdir()
    result = _child(_SAVE_IN_CHILD.format(out=str(out)), limit_bytes=200_000)
    line = _assert_clean_failure(result, out)
    assert line.startswith(f"error: could not write the weights {out / 'hdml.weights.h5'}: the file is larger than "
                           "this process may write (file size limit); nothing was written under that name"), line


def test_a_full_tmpfs_in_a_real_process_is_one_line_not_a_crash(tmp_path, small_disk):
    disk = small_disk(300_000)
    result = _child(_SAVE_IN_CHILD.format(out=str(disk)))
    line = _assert_clean_failure(result, disk)
    assert line.startswith(f"error: could not write the weights {disk / 'hdml.weights.h5'}: the disk is full; "
                           "nothing was written under that name"), line


def test_a_run_whose_disk_is_too_small_stops_before_training(tmp_path, small_disk):
    """Check before working: the disk of --output_dir is measured against what the run will write (weights,
    .keras with the optimizers, checkpoints) before the first step, not found full after hours of training."""
    import sys
    disk = small_disk(200_000)
    driver = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_driver.py")
    result = subprocess.run([sys.executable, driver, "--dataset=digits", "--image_size=32", "--batch_size=8",
                             "--steps=4", "--steps_per_epoch=2", "--embedding_size=8", "--kmeans_restarts=1",
                             "--verbose=0", f"--output_dir={disk / 'run'}"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")][-1]
    assert line.startswith(f"error: not enough disk space for this run: {disk / 'run'} has ") and (
        "free some space or choose another directory") in line, line
    assert "training hdml" not in result.stdout


# ------------------------------------------------------------------------------------------- the serving tools
@pytest.fixture(scope="module")
def keras_model(tmp_path_factory):
    from hdml_tf import rundir
    m = HDMLModel(tiny_backbone(16, seed=4), num_classes=3, config=HDMLConfig(embedding_size=8))
    return rundir.save_keras(m, str(tmp_path_factory.mktemp("model") / "model.keras"), resize=20)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_unwritable_outputs_of_embed_search_and_evaluate_are_one_line_before_work(readonly_dir, keras_model, photos,
                                                                                    monkeypatch):
    from conftest import load_tool
    from hdml_tf.errors import HDMLError
    embed, evaluate = load_tool("embed"), load_tool("evaluate")
    calls = []
    monkeypatch.setattr("hdml_tf.rundir.load_embedder", lambda *a, **k: calls.append(a) or pytest.fail("loaded"))
    with pytest.raises(HDMLError, match=rf"^cannot write --output={readonly_dir / 'x.npz'}: (permission denied|the "
                                        r"file system is read-only); expected a writable directory$"):
        embed.embed_folder(keras_model, str(photos), str(readonly_dir / "x.npz"), verbose=0)
    with pytest.raises(HDMLError, match=rf"^cannot write --output_json={readonly_dir / 'r.json'}: "):
        evaluate.evaluate(keras_model, dataset="digits", output_json=str(readonly_dir / "r.json"), progress=False,
                          printer=lambda *a: None)
    with pytest.raises(HDMLError, match=rf"^cannot write into --plots_dir={readonly_dir / 'plots'}|^cannot create "
                                        rf"--plots_dir={readonly_dir / 'plots'}"):
        evaluate.evaluate(keras_model, dataset="digits", plots_dir=str(readonly_dir / "plots"), progress=False,
                          printer=lambda *a: None)
    assert not calls  # refused before the model was loaded


def test_search_tool_with_an_unwritable_grid_is_one_line_before_embedding(readonly_dir, tmp_path):
    import sys
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "search.py")
    (tmp_path / "index.npz").write_bytes(b"not read: the grid is checked first")
    result = subprocess.run([sys.executable, tool, f"--index={tmp_path / 'index.npz'}", "--query=q.png",
                             f"--grid={readonly_dir / 'grid.png'}"], capture_output=True, text=True, timeout=180,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot write --grid={readonly_dir / 'grid.png'}")


def test_embed_tool_on_a_full_disk_is_one_line_and_leaves_no_partial_index(keras_model, photos, tmp_path,
                                                                           monkeypatch):
    from conftest import load_tool
    from hdml_tf import atomic
    embed = load_tool("embed")
    output = tmp_path / "x.npz"
    monkeypatch.setattr(atomic, "_write_file", _full_disk_writer)
    with pytest.raises(atomic.WriteError, match=rf"^could not write the index {output}: the disk is full; nothing "
                                                r"was written under that name$"):
        embed.embed_folder(keras_model, str(photos), str(output), verbose=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no x.npz, no x.tmp.npz, no hidden temporary
