"""tools/train.py as a user runs it, with the tests' tiny backbone in place of InceptionV1, so a whole run (data,
raw-pixel and untrained scores, training, saving, scoring) takes seconds and can be signalled or killed.

    python tests/train_driver.py --dataset=digits --steps=4 ... (any tools/train.py flags)

Everything else is the real tool: flag parsing, `run_experiment`, the run directory, one-line errors, exit codes.
Two environment variables let a test act at a known step: DRIVER_STEP_SECONDS=s sleeps s seconds after each step
(time for a signal to arrive mid-run), and every finished step prints `DRIVER_STEP <global step>` on stdout.
"""
import os
import runpy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
# As in the real tool, tools/common_flags.py is imported before TensorFlow: --deterministic turns oneDNN off then.
sys.path.insert(0, str(HERE.parent / "tools"))
import common_flags  # noqa: E402,F401

import keras  # noqa: E402

import hdml_tf.backbones  # noqa: E402
from conftest import tiny_backbone  # noqa: E402
from hdml_tf import experiment  # noqa: E402


def _tiny(name, image_size, weights=None, **options):
    model = tiny_backbone(image_size=image_size)
    model.backbone_name = name  # what the run records; the network itself is the tiny one
    return model


class _Report(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.step = 0
        self.pause = float(os.environ.get("DRIVER_STEP_SECONDS", "0"))

    def resume_at(self, step):
        self.step = int(step)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        print(f"DRIVER_STEP {self.step}", flush=True)
        if self.pause:
            time.sleep(self.pause)


_fit = experiment.fit


def _fit_reporting(model, run, hdml, train, callbacks=(), initial_step=0):
    return _fit(model, run, hdml, train, list(callbacks) + [_Report()], initial_step)


hdml_tf.backbones.build_backbone = _tiny
experiment.fit = _fit_reporting
sys.argv = [str(HERE.parent / "tools" / "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
