"""Periodic evaluation in run_experiment (last + selected checkpoint) and tools/evaluate.py on the finished run.

One tiny digits run (2 steps, 32 px, evaluated every epoch) is trained once per module; the tool must reproduce, in a
subprocess, the metrics computed in-process on the same saved model.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "evaluate.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tool(*flags, timeout=180):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1"}
    return subprocess.run([sys.executable, str(TOOL), *flags], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from hdml_tf.config import HDMLConfig, OptimConfig
    from hdml_tf.config import RunConfig
    from hdml_tf.experiment import run_experiment

    out = tmp_path_factory.mktemp("run")
    run = RunConfig(dataset="digits", backbone="inception_v1_slim", image_size=32, batch_size=8, steps=2,
                    steps_per_epoch=1, eval_every_epochs=1, eval_batch_size=128, output_dir=str(out), verbose=0)
    results = run_experiment(run, HDMLConfig(embedding_size=16), OptimConfig(), printer=lambda *a: None)
    return run, out, results


def test_run_reports_last_and_selected_checkpoint(trained):
    _, out, results = trained
    stored = json.loads((out / "results.json").read_text())
    selection = stored["selection"]["hdml"]
    assert selection["monitor"] == "val_recall@1" and selection["on"] == "test" and selection["last_step"] == 2
    best_row = f"hdml (best val_recall@1 at step {selection['best_step']})"
    assert selection["row"] == best_row
    assert {"hdml", best_row} <= set(stored["test"]), stored["test"].keys()
    for row in ("hdml", best_row):
        assert 0.0 <= stored["test"][row]["recall@1"] <= 1.0
    with open(out / "eval_hdml.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    best_csv = max(rows, key=lambda r: float(r["recall@1"]))  # first of equal values wins (strict improvement)
    assert int(best_csv["step"]) == selection["best_step"]
    assert (out / "hdml.best.weights.h5").stat().st_size > 0
    assert (out / "hdml.keras").stat().st_size > 0
    with open(out / "history_hdml.csv", newline="") as f:
        header = next(csv.reader(f))
    assert {"val_recall@1", "val_nmi", "val_map@r"} <= set(header), header


def test_validation_fraction_needs_periodic_evaluation():
    from hdml_tf.config import ConfigError
    from hdml_tf.config import RunConfig

    with pytest.raises(ConfigError, match="eval_every_epochs"):
        RunConfig(dataset="digits", validation_fraction=0.25)
    with pytest.raises(ConfigError, match="monitor"):
        RunConfig(dataset="digits", eval_every_epochs=1, monitor="accuracy")
    assert RunConfig(dataset="digits", eval_every_epochs=1, validation_fraction=0.4, monitor="val_nmi")


def test_tool_matches_in_process_metrics_and_writes_plots(trained, tmp_path):
    from hdml_tf.evaluation import embed_dataset, evaluate
    from hdml_tf.experiment import eval_dataset, load_splits
    from hdml_tf.rundir import load_keras

    run, out, results = trained
    report_path, plots = tmp_path / "eval.json", tmp_path / "plots"
    result = _tool(f"--model={out}", f"--output_json={report_path}", f"--plots_dir={plots}", "--tsne_points=120",
                   "--progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NMI" in result.stdout and "R@1" in result.stdout and "MAP@R" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["dataset"] == "digits" and report["split"] == "test" and report["num_images"] == 896
    assert (report["image_size"], report["resize"]) == (32, 32)
    assert report["recall_ks"] == [1, 2, 4, 8]

    model = load_keras(str(out / "hdml.keras"), compile=False)
    embeddings, labels = embed_dataset(model, eval_dataset(run, load_splits(run)[1]), progress=False)
    expected = evaluate(embeddings, labels, (1, 2, 4, 8))  # the official k-means protocol is the default
    assert report["clustering_protocol"] == ("NMI/F1: k-means, best of 10 restarts, random_state 1, k = 5 "
                                             "(official protocol)")
    assert report["clustering_protocol"] in result.stdout.splitlines()
    assert set(report["metrics"]) == set(expected)
    # The tool runs in a fresh process; this one may carry global TensorFlow settings of earlier tests (op
    # determinism, one inter-op thread: irreversible), whose kernels round differently, so a near-tie between two
    # neighbours can flip for one query of 896: allow that, no more.
    one_query = 1.0 / report["num_images"]
    for key, value in expected.items():
        assert report["metrics"][key] == pytest.approx(value, abs=1.5 * one_query), key
        # the saved .keras is the last checkpoint the run scored itself
        assert report["metrics"][key] == pytest.approx(results["test"]["hdml"][key], abs=1.5 * one_query), key
    for name in ("tsne.png", "retrieval.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000, name


@pytest.mark.parametrize("flags, message", [
    (["--model=/nonexistent/run"], "error: model /nonexistent/run not found"),
    ([], "error: --model is required"),
])
def test_errors_are_one_line(flags, message):
    result = _tool(*flags, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message), last
    assert "Traceback" not in result.stderr


def test_bad_dataset_is_one_line(trained):
    _, out, _ = trained
    result = _tool(f"--model={out}", "--dataset=cub200", "--progress=false")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "error: dataset=cub200 needs --data_dir (where its archive " \
                                                      "is unpacked)"
    assert "Traceback" not in result.stderr
