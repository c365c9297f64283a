#!/usr/bin/env python
"""Train an embedding with HDML (or the plain baseline) and score it on the unseen test classes.

    python tools/train.py                              # the embedded glyph demo, a few minutes on a CPU
    python tools/train.py --flagfile=configs/demo.cfg --compare_baseline
    python tools/train.py --flagfile=configs/cub200_npair.cfg --data_dir=/data/CUB_200_2011 \
        --weights=/weights/tf_ckpt_from_caffe.mat

Prints NMI, F1, Recall@K and MAP@R for raw pixels, the untrained network and the trained one(s), and writes
results.json, history_*.csv, curves_*.png and the weights into --output_dir.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # noqa: E402

import common_flags  # noqa: E402

# With no flags, the embedded demo (configs/demo.cfg spells the same values out); the paper's runs use the
# flagfiles in configs/.
DEMO_DEFAULTS = {
    "dataset": "glyphs", "backbone": "inception_v1_slim", "image_size": 64, "embedding_size": 64,
    "batch_size": 32, "steps": 600, "steps_per_epoch": 100, "learning_rate": 1e-3, "lr_decay_steps": ["450"],
    "weight_decay": 0.0, "output_dir": "runs/demo"}
common_flags.define_training_flags()
for _name, _value in DEMO_DEFAULTS.items():
    common_flags.FLAGS.set_default(_name, _value)


@common_flags.run_main
def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])} (flags start with --)")
    run, hdml, optim = common_flags.configs_from_flags()
    from hdml_tf.experiment import run_experiment
    run_experiment(run, hdml, optim, compare_baseline=common_flags.FLAGS.compare_baseline)


if __name__ == "__main__":
    app.run(main, flags_parser=common_flags.parse_flags)
