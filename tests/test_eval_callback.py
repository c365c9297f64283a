"""EvaluationCallback, embedding helpers and the class-disjoint validation split, on a tiny Dense model."""
import csv
import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from hdml_tf.data.image_set import ImageSet
from hdml_tf.evaluation import (EvaluationCallback, EvaluationFiles, EvaluationProtocol, embed_dataset,
                                official_schedule, split_validation_classes)


def _tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,))
    outputs = keras.layers.UnitNormalization()(keras.layers.Dense(4)(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def _eval_dataset():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    y = np.repeat(np.arange(5), 8).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


def _train_arrays(n=32):
    rng = np.random.default_rng(1)
    return rng.standard_normal((n, 8)).astype(np.float32), rng.standard_normal((n, 4)).astype(np.float32)


def test_epoch_evaluation_writes_logs_csv_tensorboard_and_checkpoints(tmp_path):
    model = _tiny_model()
    best = str(tmp_path / "best.weights.h5")
    last = str(tmp_path / "last.weights.h5")
    csv_path = str(tmp_path / "eval.csv")
    files = EvaluationFiles(best_weights=best, last_weights=last, csv=csv_path, tensorboard=str(tmp_path / "tb"),
                            summary=str(tmp_path / "summary.json"))
    callback = EvaluationCallback(_eval_dataset(), protocol=EvaluationProtocol(recall_ks=(1, 2)), monitor="recall@1",
                                  files=files, verbose=0)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt.weights.h5"), monitor="val_recall@1",
                                                 mode="max", save_best_only=True, save_weights_only=True)
    x, y = _train_arrays()
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback, checkpoint])

    for key in ("val_nmi", "val_f1", "val_recall@1", "val_recall@2", "val_map@r", "val_r_precision"):
        assert len(history.history[key]) == 2 and all(0.0 <= v <= 1.0 for v in history.history[key])
    assert [row["step"] for row in callback.history] == [4, 8]
    assert os.path.getsize(best) > 0 and os.path.getsize(last) > 0
    assert os.path.exists(tmp_path / "ckpt.weights.h5")  # ModelCheckpoint saw val_recall@1 in the logs
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [4, 8] and "recall@1" in rows[0] and "epoch" in rows[0]
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    tags = {v.tag for f in glob.glob(str(tmp_path / "tb" / "*"))
            for e in tf.compat.v1.train.summary_iterator(f) for v in e.summary.value}
    assert {"val_recall@1", "val_nmi", "val_map@r"} <= tags
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["monitor"] == "val_recall@1" and summary["last"]["step"] == 8
    assert summary["best"]["recall@1"] == max(r["recall@1"] for r in callback.history)

    # The best weights reproduce the best result.
    restored = _tiny_model(seed=1)
    restored.load_weights(best)
    again = EvaluationCallback(_eval_dataset(), protocol=EvaluationProtocol(recall_ks=(1, 2)), verbose=0)
    again.set_model(restored)
    assert again.evaluate_now()["recall@1"] == pytest.approx(callback.best["recall@1"])


def test_step_schedule_reaches_epoch_logs_and_evaluates_the_last_step(tmp_path):
    model = _tiny_model()
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(dict(logs))

    callback = EvaluationCallback(_eval_dataset(), every_n_steps=3, verbose=0,
                                  protocol=EvaluationProtocol(recall_ks=(1,), clustering=False, with_map=False))
    x, y = _train_arrays()
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback, Spy()])
    # 4 steps per epoch: evaluations at steps 3 and 6, and at the end of training (step 8, not on the schedule).
    assert [row["step"] for row in callback.history] == [3, 6, 8]
    assert all("val_recall@1" in logs for logs in seen)
    assert seen[0]["val_recall@1"] == callback.history[0]["recall@1"]
    assert len(history.history["val_recall@1"]) == 2


def test_step_schedule_with_steps_per_execution():
    model = _tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", steps_per_execution=2)
    callback = EvaluationCallback(_eval_dataset(), every_n_steps=3, verbose=0,
                                  protocol=EvaluationProtocol(recall_ks=(1,), clustering=False, with_map=False))
    x, y = _train_arrays()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    # Keras reports after steps 2, 4, 6, 8: step 3 is caught at the report of step 4, step 6 at 6, and the end of
    # training (step 8) is evaluated too.
    assert [row["step"] for row in callback.history] == [4, 6, 8]


def test_official_schedule():
    steps = [s for s in range(1, 5300) if official_schedule(s)]
    assert steps[:3] == [500, 1000, 1500] and 5000 in steps
    assert [s for s in steps if s > 5000][:3] == [5056, 5120, 5184]
    assert not official_schedule(0) and not official_schedule(64)


def test_callback_rejects_bad_settings(tmp_path):
    ds = _eval_dataset()
    with pytest.raises(ValueError, match="monitor"):
        EvaluationCallback(ds, monitor="recall@3", protocol=EvaluationProtocol(recall_ks=(1, 2)))
    with pytest.raises(ValueError, match="weights.h5"):
        EvaluationCallback(ds, files=EvaluationFiles(best_weights=str(tmp_path / "best.h5")))
    with pytest.raises(ValueError, match="schedule"):
        EvaluationCallback(ds, schedule="weekly")
    with pytest.raises(ValueError, match="either"):
        EvaluationCallback(ds, schedule="official", every_n_steps=10)
    assert EvaluationCallback(ds, monitor="val_map@r").monitor == "map@r"


def test_split_validation_classes_is_class_disjoint_and_remapped():
    labels = np.repeat(np.arange(10), 3)
    image_set = ImageSet(labels=labels, class_names=[f"c{i}" for i in range(10)],
                         images=np.zeros((30, 2, 2, 3), np.uint8), name="toy/train")
    train, val = split_validation_classes(image_set, 0.3, seed=1)
    assert (train.num_classes, val.num_classes) == (7, 3)
    assert len(train) + len(val) == 30
    assert not set(train.class_names) & set(val.class_names)
    assert set(np.unique(val.labels)) == {0, 1, 2} and val.name == "toy/train[val]"
    again = split_validation_classes(image_set, 0.3, seed=1)[1]
    assert list(again.class_names) == list(val.class_names)
    with pytest.raises(ValueError, match="at least 4"):
        split_validation_classes(image_set.subset(np.arange(9)).remap(), 0.5)


def test_embed_dataset_and_evaluating_an_image_set():
    def model(x):  # any callable; its output is not normalized: embed_dataset normalizes
        return 3.0 * tf.reshape(tf.cast(x, tf.float32), [tf.shape(x)[0], -1])[:, :6]

    emb, labels = embed_dataset(model, _eval_dataset().map(lambda x, y: (x[:, :6], y)), progress=False)
    assert emb.shape == (40, 6) and labels.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="finite"):
        embed_dataset(model, _eval_dataset().repeat(), progress=False)

    # An ImageSet is evaluated through the one evaluation pipeline (hdml_tf.data.pipeline.make_eval_dataset).
    from hdml_tf.data.images import Augment
    from hdml_tf.data.pipeline import make_eval_dataset
    from hdml_tf.evaluation import metrics
    rng = np.random.default_rng(2)
    image_set = ImageSet(labels=np.repeat(np.arange(4), 5), class_names=list("abcd"),
                         images=rng.integers(0, 255, (20, 4, 4, 3), dtype=np.uint8), name="toy/test")
    dataset = make_eval_dataset(image_set, 7, Augment(resize=4, crop=3), verbose=0)
    images, _ = next(iter(dataset))
    assert images.shape == (7, 3, 3, 3) and images.dtype == tf.float32
    callback = EvaluationCallback(dataset, protocol=EvaluationProtocol(recall_ks=(1, 2)), verbose=0)
    callback.set_model(model)
    results = callback.evaluate_now()
    assert set(callback.metrics_of(results)) == {"nmi", "f1", "recall@1", "recall@2", "map@r", "r_precision"}
    emb, labels = embed_dataset(model, dataset, progress=False)
    assert callback.last_metrics == pytest.approx(metrics.evaluate(emb, labels, (1, 2)))


def test_nmi_f1_follow_the_official_protocol_and_the_table_says_so(tmp_path, capsys):
    """Default: k-means with k = the number of classes, best of 10 restarts, random_state 1 (official
    evaluate_cluster); --kmeans_restarts / n_init=1 is named as not official in the printed table and the JSON."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    from hdml_tf.evaluation import metrics

    model = _tiny_model()
    callback = EvaluationCallback(_eval_dataset(), protocol=EvaluationProtocol(recall_ks=(1,)),
                                  files=EvaluationFiles(summary=str(tmp_path / "s.json")), verbose=1)
    callback.set_model(model)
    row = callback.evaluate_now()
    embeddings, labels = embed_dataset(model, _eval_dataset(), progress=False)
    official = KMeans(n_clusters=5, n_init=10, random_state=1).fit_predict(embeddings)
    assert row["nmi"] == normalized_mutual_info_score(labels, official)
    assert row["f1"] == metrics.pairwise_f1(labels, official)
    callback.on_train_end()
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == "NMI/F1: k-means, best of 10 restarts, random_state 1, k = 5 (official protocol)"
    assert json.loads((tmp_path / "s.json").read_text())["clustering_protocol"] == printed[-1]

    quick = EvaluationCallback(_eval_dataset(), protocol=EvaluationProtocol(recall_ks=(1,), kmeans_restarts=1),
                               verbose=0)
    quick.set_model(model)
    one_run = KMeans(n_clusters=5, n_init=1, random_state=1).fit_predict(embeddings)
    assert quick.evaluate_now()["nmi"] == normalized_mutual_info_score(labels, one_run)
    assert quick.describe_protocol().startswith("NMI/F1: k-means, 1 run, random_state 1, k = 5 (not the official protocol")


def test_run_config_kmeans_restarts():
    from hdml_tf.config import ConfigError, RunConfig
    from hdml_tf.evaluation import metrics

    assert RunConfig(dataset="digits").kmeans_restarts == 10 == metrics.OFFICIAL_KMEANS_RESTARTS
    with pytest.raises(ConfigError, match="kmeans_restarts=0 must be >= 1"):
        RunConfig(dataset="digits", kmeans_restarts=0)
