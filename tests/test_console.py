"""What a person sees while the tools run: a quiet start, one device line, progress lines that fit the terminal and
have a known total, one partial-copy warning per run, a summary naming files that exist, a legible retrieval grid.

Terminals are stood in for by StringIO streams that say they are terminals; the expected lines are worked out by
hand in each test (times come from a fake clock).
"""
import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hdml_tf.progress import Activity, CountProgress, end_line, fit_line
from hdml_tf.training_progress import TrainingProgress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import common_flags  # noqa: E402  (tools/common_flags.py: the quiet start every tool shares)

# Start-up lines TensorFlow 2.21 printed on the 2-core CPU machine before the quiet start (issue 16), verbatim.
TF_STARTUP = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796298396.562256   16341 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders.",
    "I0000 00:00:1796298396.562661   16341 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    "To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
    "E0000 00:00:1796298410.050129   16341 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)",
    "W1203 11:50:42.417412   16341 gpu_device.cc:2342] Cannot dlopen some GPU libraries.",
]


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self):
        return True


def screen_lines(text: str):
    """Every line as drawn: each carriage return starts a redraw, each newline a new line."""
    return [segment for line in text.split("\n") for segment in line.split("\r")]


def user_env(**extra):
    """The environment of a user who set nothing (conftest quiets TensorFlow for the test process itself)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return {**env, **extra}


# ------------------------------------------------------------------------------------------------ quiet start
def test_tensorflow_startup_lines_are_recognised_and_nothing_else():
    assert all(common_flags.is_tensorflow_noise(line) for line in TF_STARTUP)
    for line in ("error: batch_size=9 does not fit the npair layout", "warning: cars196: partial copy: 48 of 8,054",
                 "F0000 00:00:1796298410.050129   16341 cuda_platform.cc:52] fatal", "device: CPU, 2 cores",
                 "Traceback (most recent call last):", "I0000 is not a log line"):
        assert not common_flags.is_tensorflow_noise(line), line


def test_filtered_stderr_drops_tensorflow_lines_written_by_any_code_and_keeps_the_rest(capfd):
    with common_flags.filtered_stderr():
        for line in TF_STARTUP[:3]:
            os.write(2, (line + "\n").encode())  # file descriptor 2, as C++ code writes
        os.write(2, b"something else the user must see\n")
        os.write(2, (TF_STARTUP[4] + "\n").encode())
        os.write(2, b"and this too\n")
    assert capfd.readouterr().err.splitlines() == ["something else the user must see", "and this too"]


def test_requested_verbosity_reads_the_command_line_and_flagfiles(tmp_path):
    flagfile = tmp_path / "run.cfg"
    flagfile.write_text("--dataset=glyphs\n--verbose=2\n")
    assert common_flags.requested_verbosity(["train.py"]) == 1
    assert common_flags.requested_verbosity(["train.py", "--verbose=0"]) == 0
    assert common_flags.requested_verbosity(["train.py", "--verbose", "2"]) == 2
    assert common_flags.requested_verbosity(["train.py", f"--flagfile={flagfile}"]) == 2
    assert common_flags.requested_verbosity(["train.py", f"--flagfile={flagfile}", "--verbose=1"]) == 1
    assert common_flags.requested_verbosity(["train.py", "--verbose=lots"]) == 1  # absl reports the bad value


def test_quiet_start_on_this_machine_device_line_and_verbose_2():
    """A tool's start in a fresh process, as a user runs it (no TF_CPP_MIN_LOG_LEVEL, no CUDA_VISIBLE_DEVICES):
    the device line and nothing on stderr; with --verbose=2 TensorFlow's own lines are back (so they exist and the
    quiet start is what removes them)."""
    script = ("import sys; sys.path.insert(0, 'tools'); import common_flags; "
              "print(common_flags.device_line('float16'))")
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=user_env(),
                           timeout=180)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stderr == ""
    assert re.fullmatch(r"device: (CPU, \d+ cores? \(no GPU found\)|\d+ × .+), mixed precision float16\n",
                        quiet.stdout), quiet.stdout
    loud = subprocess.run([sys.executable, "-c", script, "--verbose=2"], capture_output=True, text=True, cwd=ROOT,
                          env=user_env(), timeout=180)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert any(common_flags.is_tensorflow_noise(line) for line in loud.stderr.splitlines()), loud.stderr
    assert loud.stdout == quiet.stdout


def test_train_tool_bad_value_is_the_only_line_even_after_importing_tensorflow(tmp_path):
    """tools/train.py imports TensorFlow while defining its flags; a bad value is still exactly one line."""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--batch_size=9",
                             f"--output_dir={tmp_path}/out"], capture_output=True, text=True, cwd=ROOT,
                            env=user_env(), timeout=180)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: batch_size=9 does not fit the npair layout: expected a multiple of 2 with at least 2 tuples (e.g. 8)"]
    assert "E0000" not in result.stderr and "cuInit" not in result.stderr


def test_log_records_print_as_warning_lines_after_a_live_progress_line(capsys):
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        common_flags.configure_logging(1)
        terminal = Terminal()
        now = [0.0]
        bar = CountProgress("embedding", total=10, stream=terminal, clock=lambda: now[0], width=80)
        now[0] = 1.0
        bar.update(4)  # drawn in place, no newline yet
        logging.getLogger("hdml_tf.test").warning("something to know")
        logging.getLogger("hdml_tf.test").info("a plain note")
        assert terminal.getvalue().endswith("\n")  # the live line was ended first
        assert capsys.readouterr().err.splitlines() == ["warning: something to know", "a plain note"]
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in before[0]:
            root.addHandler(handler)
        root.setLevel(before[1])
        end_line()


# ------------------------------------------------------------------------------------------------ lines
def test_fit_line_drops_the_least_important_parts_and_sizes_the_bar():
    parts = [("hdml", 0), ("250/600", 0), ("41%", 4), ("loss 50.12", 10), ("J_m 49.87", 9), ("| 3.10 steps/s,", 2),
             ("1:53 left", 1)]
    wide = fit_line(parts, 100, fraction=0.5, bar_index=2)
    # 30 columns of bar (28 inside the brackets), half of them filled
    assert wide == "hdml 250/600 [=============>              ] 41% loss 50.12 J_m 49.87 | 3.10 steps/s, 1:53 left"
    narrow = fit_line(parts, 40, fraction=0.5, bar_index=2)
    assert narrow == "hdml 250/600 41% loss 50.12 J_m 49.87"  # the bar and speed parts (lowest priority) dropped
    assert len(fit_line(parts, 12)) <= 11


def test_count_progress_in_a_terminal_and_into_a_file():
    now = [0.0]
    terminal = Terminal()
    bar = CountProgress("untrained network: embedding test images", total=4224, stream=terminal,
                        clock=lambda: now[0], width=100)
    for _ in range(4):
        now[0] += 0.5
        bar.update(1000)  # 2,000 images/s
    bar.update(224)
    now[0] += 0.1
    bar.close()
    lines = [line.rstrip() for line in screen_lines(terminal.getvalue()) if line.strip()]
    assert lines[1].startswith("untrained network: embedding test images: 2,000/4,224 [")
    assert lines[1].endswith("] 47% 2,000 images/s 0:01 left")  # 2,224 left at 2,000/s
    assert lines[-1] == "untrained network: embedding test images: 4,224 images in 0:02 (2,011 images/s)"  # /2.1 s
    assert all(len(line) <= 99 for line in lines)
    into_file = io.StringIO()
    bar = CountProgress("reading", total=10, stream=into_file, clock=lambda: now[0])
    bar.update(10)
    bar.close()
    assert into_file.getvalue() == "reading: 10 images in 0:00\n"  # one line, no redraws


def test_transient_lines_and_activity_leave_nothing_or_one_final_line():
    now = [0.0]
    terminal = Terminal()
    bar = CountProgress("evaluation at step 100: embedding", total=10, stream=terminal, clock=lambda: now[0],
                        transient=True)
    now[0] = 1.0
    bar.update(5)
    bar.close()
    assert terminal.getvalue().endswith("\r" + " " * len(screen_lines(terminal.getvalue())[1]) + "\r")
    into_file = io.StringIO()
    with Activity("scoring", stream=into_file, clock=lambda: now[0]):
        now[0] += 75
    assert into_file.getvalue() == "scoring: done in 1:15\n"


# ------------------------------------------------------------------------------------------------ training line
HDML_LOGS = {"loss": 54.7311, "j_m": 54.1888, "j_syn": 0.5423, "j_gen": 200663.45, "j_recon": 39783.23,
             "j_soft": 160880.2, "j_ce": 4.7139, "weight_decay": 0.0, "pull_factor": 0.9999, "syn_weight": 0.0123,
             "pulled_fraction": 0.5729, "j_avg": 1e6, "j_gen_avg": 1e6, "skipped_steps": 0.0,
             # diagnostics another issue adds: not shown, never break the width
             "grad_norm_generator": 123456.789, "some_future_quantity_with_a_long_name": 1e-7}


def _run_bar(width, logs, steps=100, per_epoch=50, initial=0):
    now = [0.0]
    terminal = Terminal()
    bar = TrainingProgress(steps, initial, per_epoch, "hdml", stream=terminal, width=width, clock=lambda: now[0],
                           interval=0.0)
    bar.on_train_begin()
    for epoch in range(initial // per_epoch, steps // per_epoch):
        bar.on_epoch_begin(epoch)
        for batch in range(per_epoch):
            now[0] += 0.5 if batch else 20.2  # the first step of an epoch waits for whatever ran in between
            bar.on_train_batch_end(batch, dict(logs))
        bar.on_epoch_end(epoch, dict(logs))
    bar.on_train_end()
    return screen_lines(terminal.getvalue())


@pytest.mark.parametrize("width", [100, 80])
def test_training_line_fits_the_terminal_with_every_logged_quantity(width):
    lines = [line.rstrip() for line in _run_bar(width, HDML_LOGS) if line.strip()]
    assert all(len(line) <= width - 1 for line in lines), max(lines, key=len)
    assert not any("j_gen" in line or "grad_norm" in line or "future" in line for line in lines)
    # step 10 of 100: 90 steps left at the median 0.5 s (the 20 s gap before step 1 and the first step excluded)
    tenth = next(line for line in lines if line.startswith("hdml 10/100 "))
    assert "loss 54.73" in tenth and "J_m 54.19" in tenth and "2.00 steps/s, 0:45 left" in tenth
    if width == 100:
        assert "syn_w 0.01230" in tenth and "[" in tenth
    epochs = [line for line in lines if " epoch " in line]
    if width == 100:  # the whole run: two epochs of 20.2 + 49 x 0.5 s = 89.4 s
        assert epochs == [
            "hdml epoch 1/2 (step 50/100): loss 54.73 J_m 54.19 syn_w 0.01230 | 2.00 steps/s, 0:25 left",
            "hdml epoch 2/2 (step 100/100): loss 54.73 J_m 54.19 syn_w 0.01230 | 2.00 steps/s, 1:29 in all"]
    else:  # 80 columns: the speed goes first, the time left stays
        assert epochs[0] == "hdml epoch 1/2 (step 50/100): loss 54.73 J_m 54.19 syn_w 0.01230 | 0:25 left"
    assert lines[0].startswith("hdml 0/100") and "first step: building the training graph" in lines[0]


def test_training_line_of_a_resumed_baseline_with_skipped_steps():
    logs = {"loss": 3.5, "j_m": 3.5, "weight_decay": 0.0, "j_avg": 3.2, "skipped_steps": 2.0}
    lines = [line.rstrip() for line in _run_bar(100, logs, steps=100, per_epoch=50, initial=50) if line.strip()]
    assert lines[0].startswith("hdml 50/100")  # counted from the checkpoint's step, not from 0
    assert lines[-1] == "hdml epoch 2/2 (step 100/100): loss 3.500 J_m 3.500 skipped 2 | 2.00 steps/s, 0:45 in all"


def test_keras_fit_drives_the_training_line():
    import keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((24, 4), np.float32), np.zeros((24, 1), np.float32)
    terminal = Terminal()
    model.fit(x, y, batch_size=4, epochs=2, verbose=0,
              callbacks=[TrainingProgress(12, 0, 6, "toy", stream=terminal, width=100)])
    epochs = [line for line in screen_lines(terminal.getvalue()) if " epoch " in line]
    assert [line.split(":")[0] for line in epochs] == ["toy epoch 1/2 (step 6/12)", "toy epoch 2/2 (step 12/12)"]
    assert all("loss " in line for line in epochs)


# ------------------------------------------------------------------------------------------------ evaluation total
def _photos(root: Path, classes, per_class=3, size=40):
    from PIL import Image
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for c in classes:
        for k in range(per_class):
            path = root / f"{c:03d}" / f"{k}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
            labels.append(c)
    return paths, labels


def test_embedding_a_photo_split_has_a_known_total(tmp_path, monkeypatch):
    """`31/Unknown` before: path-based evaluation batches hid their count from tf.data."""
    from hdml_tf.data.image_set import ImageSet
    from hdml_tf.data.images import Augment
    from hdml_tf.data.pipeline import make_eval_dataset
    from hdml_tf.evaluation import embedding

    paths, labels = _photos(tmp_path, range(4))  # 12 images
    image_set = ImageSet(labels=np.searchsorted(np.unique(labels), labels), paths=paths, name="photos/test",
                         class_names=[str(c) for c in range(4)])
    ds = make_eval_dataset(image_set, 5, Augment(resize=36, crop=32, flip=False), verbose=0)
    assert int(ds.cardinality()) == 3  # 5 + 5 + 2 images
    seen = []

    class Recording(CountProgress):
        def update(self, n=1):
            super().update(n)
            seen.append((self.done, self.total))

    monkeypatch.setattr(embedding, "CountProgress", Recording)
    embeddings, got = embedding.embed_dataset(lambda images: images[:, 0, 0, :], ds, label="embedding test images")
    assert len(got) == 12
    assert seen == [(5, 15), (10, 15), (12, 15)]  # 3 batches x 5 until the short last batch says 12
    # the final line states the exact count (stderr is not a terminal here: that is the only line)


# ------------------------------------------------------------------------------------------------ a whole run
def _write_partial_cars(root: Path):
    """cars_annos.mat with 4 training and 4 test classes of 3 decodable JPEGs each (a partial copy)."""
    from scipy.io import savemat
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    paths, labels = _photos(root / "car_ims", [1, 2, 3, 4, 99, 100, 101, 102])
    rows = [(os.path.relpath(p, root), 1, 1, 10, 10, c, 0) for p, c in zip(paths, labels)]
    annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        for f, value in zip(fields, row):
            annotations[0, i][f] = np.array([[value]]) if f != "relative_im_path" else np.array([value])
    names = np.empty((1, 196), dtype=object)
    for c in range(196):
        names[0, c] = f"Maker Model {c + 1} Extended Cab 2012"
    savemat(str(root / "cars_annos.mat"), {"annotations": annotations, "class_names": names})


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    from hdml_tf.config import HDMLConfig, OptimConfig, RunConfig
    from hdml_tf.experiment import run_experiment

    data, out = tmp_path_factory.mktemp("cars"), tmp_path_factory.mktemp("run")
    _write_partial_cars(data)
    records, printed = [], []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    logging.getLogger().addHandler(handler)
    old_level, old_cwd = logging.getLogger().level, os.getcwd()
    logging.getLogger().setLevel(logging.INFO)
    os.chdir(ROOT)  # the summary shows the tools relative to the working directory
    try:
        run = RunConfig(dataset="cars196", data_dir=str(data), backbone="inception_v1_slim", image_size=32,
                        batch_size=8, steps=2, steps_per_epoch=1, eval_batch_size=64, output_dir=str(out),
                        verbose=1)
        results = run_experiment(run, HDMLConfig(embedding_size=16), OptimConfig(), printer=printed.append)
    finally:
        os.chdir(old_cwd)
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(old_level)
    return out, results, records, printed


def test_partial_copy_is_reported_once_per_run(partial_run):
    _, _, records, _ = partial_run
    partial = [r for r in records if "partial copy" in r]
    assert len(partial) == 1, partial  # the reader's line; run_experiment no longer repeats it
    assert partial[0].startswith("cars196: partial copy: 12 of 8,054 training images (4 of 98 classes), 12 of "
                                 "8,131 test images (4 of 98 classes) in ")


def test_end_of_run_summary_names_files_that_exist(partial_run):
    out, _, _, printed = partial_run
    lines = "\n".join(printed).splitlines()
    start = lines.index(f"run directory: {out}")  # outside the working directory: an absolute path
    files = [line.split()[0] for line in lines[start + 1:] if line.startswith("  ") and not
             line.startswith("  python")]
    assert files[:3] == ["curves_hdml.png", "results.json", "hdml.keras"]
    assert all((out / name).is_dir() if name.endswith("/") else (out / name).is_file() for name in files), files
    commands = [line.strip() for line in lines[start:] if line.startswith("  python")]
    assert commands == [f"python tools/evaluate.py --model={out} --plots_dir={out}/plots",
                        f"python tools/export.py --checkpoint={out} --output={out}/saved_model"]


def test_run_lines_fit_100_columns(partial_run):
    out, _, _, printed = partial_run
    lines = [line for text in printed for line in text.splitlines() if str(out) not in line]  # paths are as long
    assert all(len(line) <= 99 for line in lines), [line for line in lines if len(line) > 99]  # as they are


# ------------------------------------------------------------------------------------------------ retrieval grid
def test_caption_lines_wrap_and_shorten_names():
    from hdml_tf.evaluation.plots import caption_lines
    assert caption_lines("001.Black_footed_Albatross", 20) == ["001.Black_footed_", "Albatross"]
    assert caption_lines("Rose breasted Grosbeak with an extremely long name", 20) == [
        "Rose breasted", "Grosbeak with an..."]
    assert caption_lines("Pneumonoultramicroscopicsilicovolcanoconiosis", 10) == ["Pneumonoul", "tramicr..."]
    assert caption_lines("3. 0.998", 20) == ["3. 0.998"]


def test_retrieval_grid_size_follows_its_content_without_an_empty_band(tmp_path):
    from PIL import Image

    from hdml_tf.evaluation import plots
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 24, 30, 3), dtype=np.uint8)
    for rows in (1, 3):
        path = plots.plot_retrieval_grid(images[:rows], images[:rows * 3].reshape(rows, 3, 24, 30, 3),
                                         np.ones((rows, 3), bool), str(tmp_path / f"g{rows}.png"),
                                         query_labels=["001.Black_footed_Albatross with a long suffix"] * rows,
                                         similarities=np.full((rows, 3), 0.5), title="nearest neighbours")
        with Image.open(path) as img:
            gray = np.asarray(img.convert("L"))
        if rows == 1:
            one = gray.shape[0]
        else:  # two more rows add two rows' height (cell + captions), not a fixed figure
            # a row of 24 x 30 images: 1.5 in wide, so 1.2 in tall, two caption lines, the gap (at 100 dpi)
            row = plots.GRID_CELL_INCHES * 24 / 30 + 2 * plots.GRID_FONT_SIZE * 1.3 / 72 + 0.06 + 0.1
            assert abs((gray.shape[0] - one) / 2 - row * 100) < 3
        blank = np.all(gray > 250, axis=1)
        longest, run = 0, 0
        for is_blank in blank:
            run = run + 1 if is_blank else 0
            longest = max(longest, run)
        assert longest < 20, longest  # no band: at most the small gaps between title, rows and captions
