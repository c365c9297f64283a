"""tf.distribute with global-batch semantics (hdml_tf/distribute.py, HDMLModel's distributed train step).

The device set-up (2 logical CPUs, or one process per worker) must precede TensorFlow's initialization, so the
distributed runs happen in subprocesses (tests/distributed_driver.py), all started together by one module fixture:

- `mirrored`: MirroredStrategy over 2 logical CPUs vs one device, for N-pair (data split by
  `distribute.distribute_dataset`) and triplet (the plain dataset, split by Keras itself), 2 SGD steps each (SGD,
  because weights move by lr·gradient: a wrong gradient scale shows, while Adam's first steps would hide it).
- 2 MultiWorkerMirroredStrategy workers on 127.0.0.1 ports (TF_CONFIG), one replica each, repeating the N-pair
  run, against its single-device result (written by the `mirrored` process).

Tolerances (float32; the runs differ only in summation order): losses rtol 1e-4; per trainable variable the update
error |Δ_mirrored − Δ_single| / |Δ_single| < 1e-3 (observed ≤ 5e-5) and the update-norm ratio 1 ± 1e-3 (a missing
1/replicas factor gives exactly 2); every weight (BatchNorm statistics and running means included) within 1e-4 of
its scale max(1, max|w|) (observed ≤ 2e-5). Multi-worker: the two workers bitwise equal, and every weight within
1e-4 of its scale of the single-device run's.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from hdml_tf import distribute
from hdml_tf.config import ConfigError

DRIVER = Path(__file__).with_name("distributed_driver.py")
TIMEOUT = 240


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, tmp, name, env=None):
    log = open(tmp / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, str(DRIVER)] + args, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, cwd=str(DRIVER.parent))
    return proc, tmp / f"{name}.log"


def _wait(proc, log_path, deadline):
    try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    tail = log_path.read_text()[-3000:]
    assert proc.returncode == 0, f"{log_path.name} exited with {proc.returncode}:\n{tail}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the three processes at once (they share the 2 CPU cores) and waits for all of them."""
    tmp = tmp_path_factory.mktemp("distributed")
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = {"mirrored": _start(["mirrored", str(tmp / "mirrored.json"), str(tmp / "reference.npz")], tmp,
                                "mirrored")}
    for i in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        procs[f"worker{i}"] = _start(["worker", str(tmp / f"worker{i}.npz")], tmp, f"worker{i}",
                                     env={"TF_CONFIG": tf_config})
    deadline = time.time() + TIMEOUT
    failures = {}
    for name, (proc, log_path) in procs.items():
        try:
            _wait(proc, log_path, deadline)
        except AssertionError as e:
            failures[name] = str(e)
    return tmp, failures


def _report(runs):
    tmp, failures = runs
    assert "mirrored" not in failures, failures["mirrored"]
    return json.loads((tmp / "mirrored.json").read_text())


@pytest.mark.parametrize("loss", ["npair", "triplet"])
def test_mirrored_steps_equal_single_device_steps(runs, loss):
    report = _report(runs)
    r = report[loss]
    assert r["init_diff"] == 0.0
    for key, value in r["logs_single"].items():
        assert r["logs_mirrored"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert r["max_rel_update_error"] < 1e-3, (r["worst_variable"], r["rel"])
    assert 0.999 < r["update_norm_ratio_min"] <= r["update_norm_ratio_max"] < 1.001
    assert r["max_rel_diff_all_variables"] < 1e-4  # BatchNorm statistics and J_avg / J_gen included
    # Every replica holds the same weights, BatchNorm statistics and running means.
    assert r["replica_copies_max_diff"] == 0.0
    assert r["synchronized_bn"] == 2  # the backbone's BatchNorm and the metric head's BN1
    if loss == "npair":
        assert "per-replica batch 4" in report["describe"] and "global batch 8" in report["describe"]


def test_mirrored_nonfinite_step_is_skipped_on_every_replica(runs):
    r = _report(runs)["npair"]
    assert r["nan_step_skipped"] == 1.0
    assert r["nan_step_changed"] == []


def test_multi_worker_matches_single_device(runs):
    tmp, failures = runs
    assert not failures, failures
    w0, w1, ref = (np.load(tmp / f"{name}.npz") for name in ("worker0", "worker1", "reference"))
    assert bool(w0["__chief__"]) and not bool(w1["__chief__"])
    assert int(w0["__replicas__"]) == 2
    names = [k for k in w0.files if not k.startswith("__")]
    assert names and names == [k for k in ref.files if not k.startswith("__")]
    for k in names:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
        scale = max(1.0, float(np.max(np.abs(ref[k])))) if ref[k].size else 1.0
        assert np.max(np.abs(w0[k] - ref[k]), initial=0.0) <= 1e-4 * scale, k
    logs, logs_ref = json.loads(str(w0["__logs__"])), json.loads(str(ref["__logs__"]))
    for key, value in logs_ref.items():
        assert logs[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# ------------------------------------------------------------------------------------------------ in-process
def test_replica_slices_are_consecutive_and_gathering_restores_the_batch():
    # npair, 4 tuples, 2 replicas: anchors a0..a3 then positives p0..p3 (rows 0..7).
    rows = tf.range(8)
    np.testing.assert_array_equal(distribute.replica_slices(rows, 2).numpy(), [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(distribute.replica_slices(rows, 4, first=2, count=2).numpy(), [[4, 5], [6, 7]])
    images = tf.reshape(tf.range(12 * 2), [12, 2])
    assert distribute.replica_slices(images, 3).shape == (3, 4, 2)


def test_batch_must_split_evenly():
    strategy = tf.distribute.get_strategy()
    assert distribute.check_global_batch(strategy, 128, "npair") == 128
    assert "global batch 128 (64 npair tuples" in distribute.describe(strategy, 128, "npair")

    class Replicas:
        def __init__(self, n):
            self.num_replicas_in_sync = n
    with pytest.raises(ConfigError, match=r"batch_size=126 does not split evenly over 4 replicas "
                                          r"\(e.g. batch_size=120\)"):
        distribute.check_global_batch(Replicas(4), 126, "triplet")
    with pytest.raises(ConfigError, match=r"over 8 replicas \(e.g. batch_size=8\)"):
        distribute.check_global_batch(Replicas(8), 6, "npair")
    assert distribute.check_global_batch(Replicas(4), 12, "npair") == 3  # a slice need not hold whole tuples
    assert distribute.check_global_batch(Replicas(8), 120, "triplet") == 15


def test_strategy_names_and_tf_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="strategy='tpu' is unknown"):
        distribute.make_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="needs the TF_CONFIG environment variable"):
        distribute.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG is not valid JSON"):
        distribute.make_strategy("multi_worker")
    assert distribute.make_strategy("default") is tf.distribute.get_strategy()
    assert distribute.is_chief(tf.distribute.get_strategy())


def test_run_config_validates_distribution_fields():
    from hdml_tf.config import RunConfig
    with pytest.raises(ConfigError, match="strategy='gpus' is unknown"):
        RunConfig(strategy="gpus")
    with pytest.raises(ConfigError, match="mixed_precision='int8' is unknown"):
        RunConfig(mixed_precision="int8")
    assert RunConfig(strategy="mirrored", mixed_precision="bfloat16").strategy == "mirrored"


def test_gather_is_identity_on_one_device():
    x, labels = tf.ones([4, 3]), tf.constant([0, 1, 0, 1])
    y, lab = distribute.gather_global_batch((x, labels))
    assert y is x and lab is labels
    assert distribute.loss_scale_for_replicas() == 1.0


def test_synchronize_batch_norm_reaches_nested_models():
    import keras
    inner = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2), keras.layers.BatchNormalization()])
    assert distribute.synchronize_batch_norm(outer) == 2
    assert all(layer.synchronized for layer in (inner.layers[0], outer.layers[-1]))


def test_only_the_chief_writes_into_output_dir():
    from types import SimpleNamespace

    from hdml_tf.config import RunConfig
    from hdml_tf.experiment import _per_worker_output

    def worker(task_type, index, cluster):
        spec = SimpleNamespace(as_dict=lambda: cluster)
        resolver = SimpleNamespace(cluster_spec=lambda: spec, task_type=task_type, task_id=index)
        return SimpleNamespace(cluster_resolver=resolver)
    workers = {"worker": ["a:1", "b:1"]}
    run = RunConfig(output_dir="runs/x", checkpoint_dir="ckpt/x")
    assert distribute.is_chief(worker("worker", 0, workers))
    assert _per_worker_output(run, worker("worker", 0, workers)) is run
    other = _per_worker_output(run, worker("worker", 1, workers))
    assert (other.output_dir, other.checkpoint_dir) == ("runs/x/worker_1", "ckpt/x/worker_1")
    with_chief = {"chief": ["c:1"], "worker": ["a:1"]}
    assert distribute.is_chief(worker("chief", 0, with_chief))
    assert not distribute.is_chief(worker("worker", 0, with_chief))
    assert distribute.num_workers(worker("worker", 0, with_chief)) == 2
