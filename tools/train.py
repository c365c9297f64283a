#!/usr/bin/env python
"""Train an embedding with HDML (or the plain baseline) and score it on the unseen test classes.

    python tools/train.py                              # the embedded glyph demo (configs/demo.cfg), minutes on a CPU
    python tools/train.py --compare_baseline           # the demo, HDML and the plain baseline side by side
    python tools/train.py --flagfile=configs/cub200_npair.cfg --data_dir=/data/CUB_200_2011 \
        --weights=/weights/tf_ckpt_from_caffe.mat

Without --flagfile, configs/demo.cfg supplies the defaults (flags given on the command line still win); with one,
the flagfile does, on top of the paper's values that every flag defaults to (hdml_tf.config). Prints NMI, F1,
Recall@K and MAP@R for raw pixels, the untrained network and the trained one(s), and writes results.json,
history_*.csv, curves_*.png and the weights into --output_dir.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # noqa: E402

import common_flags  # noqa: E402

#: What `python tools/train.py` runs when no --flagfile is given.
DEMO_FLAGFILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.cfg")
common_flags.define_training_flags()


def with_default_flagfile(argv):
    """argv with `--flagfile=configs/demo.cfg` inserted first when the command line names no flagfile."""
    if any(a == "--flagfile" or a.startswith("--flagfile=") for a in argv[1:]):
        return argv
    return argv[:1] + [f"--flagfile={DEMO_FLAGFILE}"] + argv[1:]


def _uses_demo_flagfile() -> bool:
    # absl keeps no --flagfile value (FLAGS.flagfile raised AttributeError for every photo data set): ask argv.
    return f"--flagfile={DEMO_FLAGFILE}" in sys.argv


@common_flags.run_main
def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])} (flags start with --)")
    run, hdml, optim = common_flags.configs_from_flags()
    if not run.embedded and _uses_demo_flagfile():
        from hdml_tf.progress import wrap
        print(wrap(f"note: training {run.dataset} on the demo's schedule (configs/demo.cfg: {run.steps} steps, "
                   f"learning rate {optim.learning_rate}); the paper's settings are in configs/{run.dataset}_*.cfg "
                   f"(--flagfile=...)", stream=sys.stderr), file=sys.stderr)
    print(common_flags.device_line(run.mixed_precision))
    from hdml_tf.experiment import run_experiment
    run_experiment(run, hdml, optim, compare_baseline=common_flags.FLAGS.compare_baseline)


if __name__ == "__main__":
    sys.argv = with_default_flagfile(sys.argv)
    app.run(main, argv=sys.argv, flags_parser=common_flags.parse_flags)
