#!/usr/bin/env python
"""Does HDML help, and by how much? Train variants x seeds under identical conditions and report the spread.

    python tools/compare.py                                        # the glyph demo: baseline and hdml, seeds 0-4
    python tools/compare.py --variants=baseline,hdml,hdml_no_hardness,hdml_fixed_hardness,hdml_no_softmax,\
hdml_no_recon --seeds=0,1,2                                        # the ablations
    python tools/compare.py --variants=baseline,hdml,hdml+alpha=9  # any HDMLConfig field as an override
    python tools/compare.py --flagfile=configs/cub200_npair.cfg --data_dir=/data --output_dir=runs/cub_compare

Every training flag of tools/train.py applies to every run (without --flagfile, configs/demo.cfg is the base and
the output goes to runs/demo_compare); --variants (presets of hdml_tf.variants, optionally +FIELD=VALUE) and
--seeds choose the runs. Each (variant, seed) is trained once into <output_dir>/<variant>/seed_<s>/; the same
command run again skips finished runs, resumes killed ones from their checkpoints, and keeps failed ones as failed
(--retry_failed trains them again). --report_only trains nothing and rewrites the report from what is there.

Prints per metric the mean ± sd of each variant and the paired difference against --reference (default:
baseline) with its 95% interval (Student's t; a seeded bootstrap beside it) and the win count, and writes
compare.json, runs.csv and compare.png into --output_dir.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common_flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_FLAGFILE = os.path.join(ROOT, "configs", "demo.cfg")
DEMO_OUTPUT = os.path.join("runs", "demo_compare")

common_flags.define_training_flags()
flags.DEFINE_list("variants", ["baseline", "hdml"], "Variants to train: presets (baseline, hdml, hdml_no_hardness, "
                  "hdml_fixed_hardness, hdml_no_softmax, hdml_no_recon), each optionally followed by "
                  "+FIELD=VALUE overrides of HDMLConfig fields (e.g. hdml+alpha=9).")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds; every variant is trained once per seed.")
flags.DEFINE_string("reference", None, "The variant the others are paired against (default: baseline if listed, "
                    "else the first variant).")
flags.DEFINE_bool("retry_failed", False, "Train failed runs again (by default they are kept and reported as failed).")
flags.DEFINE_bool("report_only", False, "Train nothing; rewrite the report from the runs already in --output_dir.")
flags.DEFINE_integer("bootstrap_resamples", 10000, "Resampled means of the bootstrap interval (0: none).")
flags.DEFINE_integer("bootstrap_seed", 0, "Seed of the bootstrap resampling.")
flags.DEFINE_string("report_dir", None, "Where compare.json, runs.csv and compare.png go (default: --output_dir); "
                    "comparisons that share runs (e.g. the ablations and the main comparison, whose baseline and hdml "
                    "runs are the same) use one --output_dir and each its own --report_dir.")
flags.DEFINE_list("plot_metrics", ["recall@1", "nmi", "map@r", "f1"], "Metrics drawn in compare.png.")

#: Flags whose value each run sets itself; giving them on the command line is a mistake the tool names.
_SET_PER_RUN = {"seed": "--seeds", "hdml": "--variants (the baseline preset)", "compare_baseline": "--variants"}


def with_default_flagfile(argv):
    """argv with configs/demo.cfg and --output_dir=runs/demo_compare first when no flagfile is named."""
    if any(a == "--flagfile" or a.startswith("--flagfile=") for a in argv[1:]):
        return argv
    return argv[:1] + [f"--flagfile={DEMO_FLAGFILE}", f"--output_dir={DEMO_OUTPUT}"] + argv[1:]


def _seeds(values):
    from hdml_tf.errors import ConfigError
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ConfigError(f"--seeds={','.join(values)} must be a comma-separated list of integers") from None


@common_flags.run_main
def main(argv):
    FLAGS = common_flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])} (flags start with --)")
    from hdml_tf.errors import ConfigError
    given = [name for name in _SET_PER_RUN if _on_command_line(name, sys.argv)]
    if given:
        raise ConfigError(f"--{given[0]} is set by each run of a comparison; use {_SET_PER_RUN[given[0]]}")
    if FLAGS.bootstrap_resamples < 0:
        raise ConfigError(f"--bootstrap_resamples={FLAGS.bootstrap_resamples} must be >= 0")
    run, method, optim = common_flags.configs_from_flags()
    from hdml_tf.comparison import Comparison, format_report
    from hdml_tf.variants import parse_variants
    comparison = Comparison(run.output_dir, parse_variants(FLAGS.variants), _seeds(FLAGS.seeds), run, method, optim,
                            reference=FLAGS.reference)
    for v in comparison.variants:
        print(f"variant {v.name}: {v.describe()}")

    def refresh():
        report = comparison.report(FLAGS.bootstrap_resamples, FLAGS.bootstrap_seed)
        comparison.write_report(report, FLAGS.plot_metrics, FLAGS.report_dir)
        return report

    if not FLAGS.report_only:
        if run.deterministic:
            from hdml_tf.experiment import enable_determinism
            enable_determinism(run.seed)  # global; each run seeds itself again
        comparison.train_all(retry_failed=FLAGS.retry_failed, after_each=refresh)
    report = refresh()
    print(format_report(report))
    print(f"wrote {os.path.join(FLAGS.report_dir or comparison.path, 'compare.json')}, runs.csv and compare.png")


def _on_command_line(name, argv):
    """True when flag `name` is written on the command line itself (flagfiles may set it: they are shared with
    tools/train.py)."""
    return any(a.startswith(f"--{name}=") or a in (f"--{name}", f"--no{name}") for a in argv[1:])


if __name__ == "__main__":
    app.run(main, argv=with_default_flagfile(sys.argv), flags_parser=common_flags.parse_flags)
