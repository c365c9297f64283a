"""A run never loses work (issue 14): each test is a row of the issue's table, done the way a user does it.

The runs are tools/train.py itself (`train_driver.py`: the real tool, with the tests' tiny backbone so a run takes
seconds): run again after it finished, an unwritable or odd --output_dir, a second run into an occupied directory, two
processes on one checkpoint directory, Ctrl-C, kill -9 and resume, and what results.json records. Full disks and the
serving tools' unwritable outputs are in test_faults.py.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hdml_tf import rundir

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "train_driver.py"
#: A whole run in seconds: digits (5 + 5 classes, in memory), 32 px, the tiny backbone, 4 steps in epochs of 2.
TINY = ["--dataset=digits", "--image_size=32", "--batch_size=8", "--steps=4", "--steps_per_epoch=2",
        "--embedding_size=8", "--kmeans_restarts=1", "--eval_batch_size=256", "--verbose=0"]


def _env(**extra):
    path = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1", **extra}


def _train(*flags, cwd=None, timeout=300, **env):
    return subprocess.run([sys.executable, str(DRIVER), *flags], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=_env(**env))


def _start(*flags, cwd=None, **env):
    return subprocess.Popen([sys.executable, str(DRIVER), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=_env(**env))


def _files(directory):
    """{relative path: (sha256, mtime_ns)} of every file under a directory."""
    found = {}
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file():
            found[str(p.relative_to(directory))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return found


def _error_line(result):
    """The one line a user error prints; the whole stderr must hold no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith(("error:", "interrupted:"))]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def _history(path):
    return rundir.read_csv_rows(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished run, started as the README says for resumable runs (--output_dir and --checkpoint_dir)."""
    cwd = tmp_path_factory.mktemp("work").resolve()
    flags = TINY + ["--output_dir=run", "--checkpoint_dir=ck", "--checkpoint_every=2"]
    result = _train(*flags, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    out = cwd / "run"
    assert (out / "results.json").is_file(), sorted(p.name for p in cwd.rglob("*"))
    return cwd, flags, out


# ------------------------------------------------------------------------------------------- row 1: run it again
def test_the_same_command_after_the_run_finished_reports_it_and_changes_no_file(finished):
    """It used to say "nothing left to train", overwrite the finished history with a 7-byte file, then fail with a
    ValueError traceback."""
    cwd, flags, out = finished
    before, checkpoints = _files(out), _files(cwd / "ck")
    history = _history(out / "history_hdml.csv")
    assert [(r["epoch"], r["step"]) for r in history] == [(1, 2), (2, 4)]
    stored = json.loads((out / "results.json").read_text())["test"]["hdml"]
    for again in (_train(*flags, cwd=cwd),  # the same command
                  _train(*[f for f in flags if not f.startswith("--output_dir")], cwd=cwd)):  # its run found by ck
        assert again.returncode == 0, again.stderr[-3000:]
        assert "Traceback" not in again.stderr
        complete = [ln for ln in again.stdout.splitlines() if ln.startswith("run complete: ")]
        assert len(complete) == 1 and (cwd / complete[0].split(": ", 1)[1].split(" holds this run")[0]).resolve() == out
        row = [ln for ln in again.stdout.splitlines() if ln.startswith("hdml ")]  # the stored results, printed
        assert len(row) == 1 and f"{100 * stored['nmi']:.1f}" in row[0] and f"{100 * stored['recall@1']:.1f}" in row[0]
        assert "DRIVER_STEP" not in again.stdout  # nothing trained
        assert _files(out) == before and _files(cwd / "ck") == checkpoints  # not a byte, not a time stamp changed
    assert not (cwd / "runs").exists()  # and no new run directory was started


# ------------------------------------------------------------------------------------------- row 4: occupied
def test_another_run_into_an_occupied_output_dir_is_refused_naming_overwrite(finished):
    cwd, _, out = finished
    before = _files(out)
    other = _train(*TINY, "--steps=6", f"--output_dir={out}", cwd=cwd)
    assert other.returncode == 2
    line = _error_line(other)
    assert line.startswith(f"error: --output_dir={out} holds another run (differs in steps 6 (there: 4))"), line
    assert "pass --overwrite to replace it" in line
    assert "data:" not in other.stdout  # refused before any work
    assert _files(out) == before


def test_without_output_dir_every_run_gets_its_own_directory(tmp_path, monkeypatch):
    """The default location is unique per run: a second run of the same data set, loss and method gets version_2
    (tools/train.py's demo used to share runs/demo between every data set)."""
    from hdml_tf.config import HDMLConfig, OptimConfig, RunConfig
    from hdml_tf.experiment import resolve_output_dir
    monkeypatch.chdir(tmp_path)
    run = RunConfig(dataset="digits")
    first = resolve_output_dir(run, HDMLConfig(), OptimConfig())
    assert first.output_dir == str(Path("runs/digits_npair_hdml/version_1"))
    Path(first.output_dir).mkdir(parents=True)
    assert resolve_output_dir(run, HDMLConfig(), OptimConfig()).output_dir == str(
        Path("runs/digits_npair_hdml/version_2"))
    assert resolve_output_dir(run, HDMLConfig(hdml=False), OptimConfig(), compare_baseline=True).output_dir == str(
        Path("runs/digits_npair_baseline/version_1"))
    assert resolve_output_dir(run, HDMLConfig(), OptimConfig(), compare_baseline=True).output_dir == str(
        Path("runs/digits_npair_hdml+baseline/version_1"))
    named = RunConfig(dataset="digits", run_name="exp1")
    assert resolve_output_dir(named, HDMLConfig(), OptimConfig()).output_dir == str(Path("runs/exp1"))


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    identity = rundir.run_identity({"steps": 4}, {}, {}, ["hdml"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with rundir.claim_run(out, identity) as claim:
        assert claim.state == "new"
        (out / "history_hdml.csv").write_text("epoch,step\n1,2\n")
        claim.complete()
    other = rundir.run_identity({"steps": 6}, {}, {}, ["hdml"])
    with pytest.raises(rundir.HDMLError, match=r"holds another run \(differs in steps 6 \(there: 4\)\)"):
        rundir.claim_run(out, other)
    with rundir.claim_run(out, other, overwrite=True) as claim:
        assert claim.state == "new"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt", "run.json"]
    # A directory with a run's files but no run.json (written by an older version, or by hand) is refused too.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "results.json").write_text("{}")
    with pytest.raises(rundir.HDMLError, match=r"already holds files of another run \(results.json\); pass "
                                               r"--overwrite"):
        rundir.claim_run(legacy, identity)


def test_a_second_process_on_the_same_checkpoint_dir_is_refused(tmp_path):
    """A lock: the first process holds the checkpoint directory; the second one stops at once and names it."""
    ck = tmp_path / "ck"
    ck.mkdir()
    held = rundir.DirectoryLock(ck, "--checkpoint_dir").acquire()
    held.record_holder()
    try:
        second = _train(*TINY, f"--output_dir={tmp_path / 'out'}", f"--checkpoint_dir={ck}", timeout=120)
    finally:
        held.release()
    assert second.returncode == 2
    line = _error_line(second)
    assert line.startswith(f"error: another process (pid {os.getpid()} on ") and "is using --checkpoint_dir=" in line
    assert "data:" not in second.stdout and not list(ck.glob("hdml/ckpt-*"))


# ------------------------------------------------------------------------------------------- row 2 and row 8: where
def test_an_unwritable_output_dir_is_one_line_before_any_work(readonly_dir, tmp_path):
    """It used to train and evaluate fully (hours on a GPU), then die on a PermissionError with nothing saved."""
    result = _train(*TINY, f"--output_dir={readonly_dir}", timeout=120)
    assert result.returncode == 2
    line = _error_line(result)
    assert line.startswith(f"error: cannot write into --output_dir={readonly_dir}: "), line
    assert ("permission denied" in line or "read-only" in line) and "expected a writable directory" in line
    assert "data:" not in result.stdout  # nothing loaded, nothing trained
    # The same for the checkpoint directory, before the output directory is even created.
    result = _train(*TINY, f"--output_dir={tmp_path / 'out'}", f"--checkpoint_dir={readonly_dir / 'ck'}",
                    timeout=120)
    assert result.returncode == 2
    assert _error_line(result).startswith(f"error: cannot create --checkpoint_dir={readonly_dir / 'ck'}: ")


@pytest.mark.parametrize("where", ["parent is a file", "under /proc"])
def test_an_output_dir_that_cannot_exist_is_one_line(where, tmp_path):
    if where == "parent is a file":
        (tmp_path / "file").write_text("x")
        target, expected = tmp_path / "file" / "out", f"{tmp_path / 'file'} is a file, not a directory"
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc on this platform")
        target, expected = Path("/proc/hdml_tf_test/out"), "cannot create --output_dir=/proc/hdml_tf_test/out: "
    result = _train(*TINY, f"--output_dir={target}", timeout=120)
    assert result.returncode == 2
    line = _error_line(result)
    assert expected in line and line.endswith("expected a writable directory"), line


@pytest.mark.parametrize("layout, expected", [
    ("one class in the training split", "folder/train: batch_size=4 (npair) needs 2 distinct classes with >= 2 "
                                        "images, but only 1 have"),
    ("one image per class", "folder/train: batch_size=4 (npair) needs 2 distinct classes with >= 2 images, but "
                            "only 0 have"),
])
def test_a_folder_data_set_too_small_to_train_or_score_is_one_line_before_work(layout, expected, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    classes, per_class = (3, 4) if layout.startswith("one class") else (8, 1)
    for c in range(classes):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(tmp_path / "data" / f"c{c}" /
                                                                                    f"{i}.png")
    result = _train("--dataset=folder", f"--data_dir={tmp_path / 'data'}", "--image_size=32", "--batch_size=4",
                    "--steps=2", "--verbose=0", f"--output_dir={tmp_path / 'out'}", timeout=180)
    assert result.returncode == 2
    assert _error_line(result).startswith(f"error: {expected}")
    assert "training hdml" not in result.stdout  # found before the raw-pixel and untrained evaluations


def test_splits_that_cannot_be_scored_are_refused_before_work():
    from hdml_tf.config import HDMLConfig, RunConfig
    from hdml_tf.data.image_set import ImageSet
    from hdml_tf.errors import DataError
    from hdml_tf.experiment import check_splits

    def images(labels, name):
        labels = np.asarray(labels)
        return ImageSet(labels=labels, class_names=[str(c) for c in range(labels.max() + 1)],
                        images=np.zeros((len(labels), 8, 8, 3), np.uint8), name=name)

    run, hdml = RunConfig(dataset="glyphs", batch_size=4), HDMLConfig()
    train = images([0, 0, 1, 1], "x/train")
    check_splits(run, hdml, train, images([0, 0, 1], "x/test"))
    with pytest.raises(DataError, match=r"x/test: the test split has 1 class\(es\); scoring unseen classes needs "
                                        r"at least 2"):
        check_splits(run, hdml, train, images([0, 0, 0], "x/test"))
    with pytest.raises(DataError, match=r"x/test: every class of the test split has a single image"):
        check_splits(run, hdml, train, images([0, 1, 2], "x/test"))


# ------------------------------------------------------------------------------------------- rows 5 and 6
def _run_until(flags, step, sig, **env):
    """Starts a run and sends `sig` once it has printed DRIVER_STEP `step`; returns (exit code, stdout, stderr)."""
    proc = _start(*flags, **env)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.strip() == f"DRIVER_STEP {step}":
            proc.send_signal(sig)
            break
    stdout, stderr = proc.communicate(timeout=240)
    return proc.returncode, "".join(out) + stdout, stderr


def _events(directory):
    """{tag: [(step, value)]} of the TensorBoard event files in a directory."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2
    found = {}
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                number = tf.make_ndarray(value.tensor).item() if value.HasField("tensor") else value.simple_value
                found.setdefault(value.tag, []).append((event.step, number))
    return found


def test_ctrl_c_then_kill_9_then_resume_is_one_run_equal_to_an_uninterrupted_one(tmp_path):
    """Ctrl-C checkpoints at the current step and exits 130 without a traceback; a later kill -9 mid-epoch loses
    only the steps after the newest checkpoint; the run resumed twice ends as one run: its history has every epoch,
    numbered as in an uninterrupted run and bit-identical to one (--deterministic), its TensorBoard scalars every
    training loss and diagnostic once per epoch at the global step, its curves the whole run."""
    run_flags = ["--dataset=digits", "--image_size=32", "--batch_size=8", "--steps=8", "--steps_per_epoch=4",
                 "--embedding_size=8", "--kmeans_restarts=1", "--eval_batch_size=256", "--verbose=0",
                 "--deterministic", "--checkpoint_every=3"]
    flags = run_flags + [f"--output_dir={tmp_path / 'out'}", f"--checkpoint_dir={tmp_path / 'ck'}"]
    code, stdout, stderr = _run_until(flags, 2, signal.SIGINT, DRIVER_STEP_SECONDS="0.4")
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: training stopped by SIGINT at step ") and last.endswith(
        "holds that step: run the same command again to resume"), last
    stopped = int(last.split(" at step ")[1].split()[0])
    assert stopped in (2, 3)  # the step the signal arrived in, or the next one
    assert (tmp_path / "ck" / "hdml" / f"ckpt-{stopped:08d}.npz").is_file()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["state"] == "interrupted"

    code, stdout, stderr = _run_until(flags, 5, signal.SIGKILL, DRIVER_STEP_SECONDS="0.4")
    assert code == -signal.SIGKILL
    assert f"DRIVER_STEP {stopped + 1}" in stdout  # it resumed where Ctrl-C stopped it
    assert [r["epoch"] for r in _history(tmp_path / "out" / "history_hdml.csv")] == [1]  # epoch 1 was written

    final = _train(*flags)
    assert final.returncode == 0, final.stderr[-3000:]
    steps = [ln for ln in final.stdout.splitlines() if ln.startswith("DRIVER_STEP")]
    assert steps[0] == "DRIVER_STEP 4"  # resumed from the checkpoint of step 3
    reference = _train(*run_flags, f"--output_dir={tmp_path / 'ref'}", f"--checkpoint_dir={tmp_path / 'ref_ck'}")
    assert reference.returncode == 0, reference.stderr[-3000:]

    resumed = _history(tmp_path / "out" / "history_hdml.csv")
    uninterrupted = _history(tmp_path / "ref" / "history_hdml.csv")
    assert [(r["epoch"], r["step"]) for r in resumed] == [(1, 4), (2, 8)]
    assert resumed == uninterrupted  # every logged mean, bit for bit (the resumed epoch continued its means)
    events = _events(tmp_path / "out" / "logs" / "hdml" / "train")
    assert {"loss", "j_m", "j_syn", "j_gen", "j_recon", "j_soft", "j_ce", "pull_factor", "syn_weight",
            "pulled_fraction", "j_avg", "j_gen_avg"} <= set(events)
    assert events == _events(tmp_path / "ref" / "logs" / "hdml" / "train")
    assert [s for s, _ in events["loss"]] == [4, 8]  # once per epoch, no step twice
    assert events["loss"][0][1] == pytest.approx(resumed[0]["loss"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["test"]["hdml"] == json.loads((tmp_path / "ref" / "results.json").read_text())["test"]["hdml"]
    assert [s.get("pid") for s in results["record"]["starts"]].count(None) == 0 and len(results["record"]["starts"]) == 3
    # --deterministic ran on TensorFlow's Eigen kernels: with oneDNN two processes could differ (README).
    assert results["record"]["determinism"]["deterministic"] is True
    assert results["record"]["determinism"]["onednn"] is False


@pytest.mark.parametrize("argv, expected", [
    (["--deterministic"], "0"), (["--flagfile=FLAGFILE"], "0"), (["--flagfile=FLAGFILE", "--nodeterministic"], None),
    (["--steps=3"], None)])
def test_deterministic_tools_turn_onednn_off_before_tensorflow_starts(argv, expected, tmp_path):
    """The tools decide before TensorFlow is imported (it reads TF_ENABLE_ONEDNN_OPTS once, at import), from the
    command line and the flagfiles it names; TensorFlow then reports oneDNN off."""
    flagfile = tmp_path / "run.cfg"
    flagfile.write_text("# a flagfile\n--steps=3\n--deterministic\n")
    argv = [a.replace("FLAGFILE", str(flagfile)) for a in argv]
    code = ("import os, sys; sys.path.insert(0, 'tools'); sys.argv = ['train.py'] + sys.argv[1:]\n"
            "import common_flags\n"
            "from tensorflow.python.util import _pywrap_util_port\n"
            "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), _pywrap_util_port.IsMklEnabled())")
    env = {k: v for k, v in _env().items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                            cwd=HERE.parent, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    setting, enabled = result.stdout.split()
    assert setting == str(expected)
    if expected == "0":
        assert enabled == "False"


def test_ctrl_c_without_a_checkpoint_dir_says_nothing_was_saved(tmp_path):
    flags = TINY + ["--steps=40", "--steps_per_epoch=10", f"--output_dir={tmp_path / 'out'}"]
    code, _, stderr = _run_until(flags, 2, signal.SIGINT, DRIVER_STEP_SECONDS="0.3")
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: training stopped by SIGINT at step ") and (
        "of 40; the model was not saved (no --checkpoint_dir): pass --checkpoint_dir to be able to resume") in last


# ------------------------------------------------------------------------------------------- item 8: the record
def test_results_record_what_was_run(finished):
    import keras
    import tensorflow as tf
    _, flags, out = finished
    results = json.loads((out / "results.json").read_text())
    record = results["record"]
    assert record["data"]["train"] == {"images": 901, "classes": 5} and record["data"]["test"]["classes"] == 5
    assert record["versions"]["tensorflow"] == tf.__version__ and record["versions"]["keras"] == keras.__version__
    head = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert record["commit"]["commit"] == head.stdout.strip()
    training = results["training"]["hdml"]
    assert training["steps"] == training["final_step"] == 4 and training["skipped_steps"] == 0
    assert record["wall_seconds_this_start"] > 0 and len(record["starts"]) == 1
    assert results["run"]["steps"] == 4 and results["method"]["embedding_size"] == 8  # the full configuration
    assert results["output_dir"] == "run"


def test_a_resumed_evaluation_callback_continues_its_csv_tensorboard_and_best(tmp_path):
    """Evaluations after the resume step are trained and evaluated again: they leave the CSV and TensorBoard; the
    best is the best of what is kept, unless the best-weights file holds a dropped evaluation (then it stays)."""
    import tensorflow as tf

    from hdml_tf.evaluation.callback import EvaluationCallback, EvaluationFiles, write_scalars
    from hdml_tf.evaluation.metrics import EvaluationProtocol
    columns = ["epoch", "step", "eval_seconds", "nmi", "recall@1"]
    rows = [{"epoch": e, "step": 2 * e, "eval_seconds": 0.1, "nmi": 0.1 * e, "recall@1": r}
            for e, r in ((1, 0.5), (2, 0.7), (3, 0.9))]
    files = EvaluationFiles(csv=str(tmp_path / "eval.csv"), tensorboard=str(tmp_path / "tb"),
                            best_weights=str(tmp_path / "best.weights.h5"))
    protocol = EvaluationProtocol(recall_ks=(1,), clustering=True)
    for keep_best_file in (False, True):
        (tmp_path / "eval.csv").write_text(rundir.rows_to_csv(rows, columns))
        writer = tf.summary.create_file_writer(str(tmp_path / "tb"))
        for row in rows:
            write_scalars(writer, {"val_recall@1": row["recall@1"]}, row["step"])
        writer.close()
        best_file = tmp_path / "best.weights.h5"
        if keep_best_file:
            best_file.write_bytes(b"the weights of step 6")
        elif best_file.exists():
            best_file.unlink()
        cb = EvaluationCallback(lambda m: None, protocol=protocol, files=files, initial_step=5, verbose=0)
        assert [r["step"] for r in cb.history] == [2, 4] and cb.last["step"] == 4
        assert cb.best["step"] == (6 if keep_best_file else 4)
        assert [r["step"] for r in rundir.read_csv_rows(tmp_path / "eval.csv")] == [2, 4]
        assert rundir.csv_columns(tmp_path / "eval.csv") == columns  # the callback appends with its own header
        assert sorted(s for s, _ in _events(tmp_path / "tb")["val_recall@1"]) == [2, 4]


def test_results_list_the_skipped_images_of_a_folder_data_set(tmp_path, monkeypatch):
    """A user's folder with an unreadable file: the run trains on the rest and results.json says which file was
    skipped and why, with the counts of every split."""
    from PIL import Image

    import hdml_tf.backbones
    from conftest import tiny_backbone
    from hdml_tf.config import HDMLConfig, OptimConfig, RunConfig
    from hdml_tf.experiment import run_experiment
    rng = np.random.default_rng(0)
    for c in range(8):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(
                tmp_path / "data" / f"c{c}" / f"{i}.png")
    broken = tmp_path / "data" / "c0" / "broken.jpg"  # in whichever split c0 falls
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    monkeypatch.setattr(hdml_tf.backbones, "build_backbone", lambda name, size, **kw: tiny_backbone(image_size=size))
    run = RunConfig(dataset="folder", data_dir=str(tmp_path / "data"), image_size=32, batch_size=4, steps=2,
                    steps_per_epoch=2, kmeans_restarts=1, verbose=0, output_dir=str(tmp_path / "out"))
    results = run_experiment(run, HDMLConfig(embedding_size=8), OptimConfig(), printer=lambda *a: None)
    data = json.loads((tmp_path / "out" / "results.json").read_text())["record"]["data"]
    assert data == results["record"]["data"]
    assert data["train"]["classes"] + data["test"]["classes"] == 8
    assert data["train"]["images"] + data["test"]["images"] == 33  # the broken file is listed in its split
    skipped = data["train"]["unreadable_skipped"] + data["test"]["unreadable_skipped"]
    assert len(skipped) == 1 and skipped[0].startswith(f"{broken}: "), skipped
