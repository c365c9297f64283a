#!/usr/bin/env python
"""Reproduce one row of the paper's table: train with a config, then print our numbers beside the paper's.

    python tools/reproduce.py --flagfile=configs/cub200_npair.cfg --data_dir=/data/CUB_200_2011 \
        --weights=/weights/googlenet.mat
    python tools/reproduce.py --flagfile=configs/cars196_npair.cfg --data_dir=... --weights=... --compare_baseline
    python tools/reproduce.py --dataset=glyphs --steps=200 --batch_size=32     # a small run, no paper row

Takes every flag of tools/train.py (so the configs/*.cfg flagfiles), trains through
`hdml_tf.experiment.run_experiment` (which writes results.json, histories, curves and weights into --output_dir),
then writes into --output_dir:

  reproduction.json   the run's results, the paper's numbers for its row(s), ours − paper, and the settings in which
                      this run differs from the paper's (so a shortened run is never mistaken for a reproduction)
  paper_table.txt     the side-by-side table (`hdml_tf.paper.side_by_side`), also printed, with a line saying how NMI
                      and F1 were computed (--kmeans_restarts=10: the official protocol, k-means best of 10 restarts,
                      random_state 1, k = number of test classes)
"""
import dataclasses
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # noqa: E402

import common_flags  # noqa: E402

common_flags.define_training_flags()

#: The paper's training set-up (Sec. 4.1 and the official code); a run that differs is reported as such.
PAPER_SETUP = {"backbone": "inception_v1_caffe", "image_size": 227, "resize": 256, "steps": 8000,
               "batch_size": {"npair": 128, "triplet": 120}}


def deviations(run, hdml) -> list:
    """Human-readable list of the ways `run` differs from the paper's set-up (empty for a faithful run)."""
    from hdml_tf.data import datasets
    found = []
    if not datasets.get(run.dataset).paper_recall_ks:
        found.append(f"dataset {run.dataset} is not in the paper")
    if hdml.loss not in PAPER_SETUP["batch_size"]:
        found.append(f"loss {hdml.loss} is not in the paper")
    if not run.weights:
        found.append("no ImageNet weights (--weights): the paper fine-tunes an ImageNet GoogLeNet")
    if run.backbone != PAPER_SETUP["backbone"]:
        found.append(f"backbone {run.backbone} (paper: {PAPER_SETUP['backbone']})")
    if run.crop_size() != PAPER_SETUP["image_size"]:
        found.append(f"image size {run.crop_size()} (paper: {PAPER_SETUP['image_size']})")
    if run.steps != PAPER_SETUP["steps"]:
        found.append(f"{run.steps} steps (paper: {PAPER_SETUP['steps']})")
    paper_batch = PAPER_SETUP["batch_size"].get(hdml.loss)
    if paper_batch and run.batch_size != paper_batch:
        found.append(f"batch size {run.batch_size} (paper: {paper_batch})")
    from hdml_tf.evaluation.metrics import OFFICIAL_KMEANS_RESTARTS
    if run.kmeans_restarts != OFFICIAL_KMEANS_RESTARTS:
        found.append(f"NMI/F1 from {run.kmeans_restarts} k-means restart(s) (paper: best of "
                     f"{OFFICIAL_KMEANS_RESTARTS})")
    return found


def _difference(ours: dict, theirs: dict) -> dict:
    return {k: round(100.0 * float(ours[k]) - v, 2) for k, v in theirs.items() if k in ours}


@common_flags.run_main
def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])} (flags start with --)")
    run, hdml, optim = common_flags.configs_from_flags()
    from hdml_tf import paper
    from hdml_tf.experiment import run_experiment

    off = deviations(run, hdml)
    if off:
        print("note: this run differs from the paper's set-up, so its numbers are not a reproduction: "
              + "; ".join(off))
    start = time.time()
    results = run_experiment(run, hdml, optim, compare_baseline=common_flags.FLAGS.compare_baseline)
    table = paper.side_by_side(results, run.dataset, hdml.loss, hdml.hdml)
    if results.get("clustering_protocol"):  # every table says how its NMI/F1 were computed
        table += "\n" + results["clustering_protocol"]

    comparison = {}
    for name, flag in (("baseline", False), ("hdml", True)):
        if name in results["test"] and paper.has_paper_row(run.dataset, hdml.loss, flag):
            theirs = paper.paper_row(run.dataset, hdml.loss, flag)
            comparison[name] = {"paper_percent": theirs,
                                "ours_minus_paper_points": _difference(results["test"][name], theirs)}
    report = {
        "dataset": run.dataset, "loss": hdml.loss, "hdml": hdml.hdml,
        "compare_baseline": bool(common_flags.FLAGS.compare_baseline),
        "paper": comparison, "paper_source": paper.paper_source() if comparison else None,
        "clustering_protocol": results.get("clustering_protocol"),
        "deviations_from_paper": off, "faithful": not off,
        "wall_seconds": round(time.time() - start, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "gpus": _gpus()},
        "results": results,
    }
    out = run.output_dir
    with open(os.path.join(out, "reproduction.json"), "w") as f:
        json.dump(report, f, indent=2, default=_json_default)
    with open(os.path.join(out, "paper_table.txt"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wrote {os.path.join(out, 'reproduction.json')} and {os.path.join(out, 'paper_table.txt')}")


def _gpus():
    import tensorflow as tf
    return [d.name for d in tf.config.list_physical_devices("GPU")]


def _json_default(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return float(value)


if __name__ == "__main__":
    app.run(main, flags_parser=common_flags.parse_flags)
