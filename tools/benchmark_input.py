"""Input pipeline speed (images/s; uncached, memory cache, disk cache) beside the train step's consumption.

    python tools/benchmark_input.py                                  # ../shared/data/cub200_subset, or generated
    python tools/benchmark_input.py --dataset cub200 --data_dir ~/data/CUB_200_2011 --batch_size 128
    python tools/benchmark_input.py --model=false                    # pipeline only

The pipeline is timed alone (batches pulled as fast as possible, after `--warmup` batches). The train step is timed
on one fixed batch already in memory (`HDMLModel.train_on_batch`, after `--model_warmup` calls, so tracing is
excluded). `ratio` = cached pipeline images/s / train step images/s; the issue's target is >= 2. Results are printed
and written as JSON (`--json_out`). The timing functions live in `hdml_tf.benchmarking` (shared with tools/benchmark.py
and tools/gpu_check.py).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common_flags  # noqa: E402  (parse_flags, run_main: one-line errors, exit code 2)
from hdml_tf import benchmarking  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cub200_subset"

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "cub200", "A photo data set of hdml_tf.data.datasets (cub200, cars196, sop, folder).")
flags.DEFINE_string("data_dir", None, "Data set folder; default ../shared/data/cub200_subset beside the repo, or "
                    "generated JPEGs when that is absent.")
flags.DEFINE_string("loss", "npair", "Batch layout: npair, triplet or contrastive.")
flags.DEFINE_integer("batch_size", 96, "Batch size B; 96 fits npair, triplet and contrastive and the subset's 58 "
                     "training classes (npair needs B/2 classes).")
flags.DEFINE_integer("steps", 20, "Timed batches per measurement.")
flags.DEFINE_integer("warmup", 3, "Batches pulled before timing (fills prefetch buffers, traces functions).")
flags.DEFINE_integer("resize", 256, "Square resize before cropping (official 256).")
flags.DEFINE_integer("crop", None, "Crop size S; default: the backbone's input size (227 for inception_v1_caffe).")
flags.DEFINE_string("cache_dir", None, "Where the disk cache is written; default: a temporary folder, removed after.")
flags.DEFINE_list("modes", ["uncached", "memory", "disk"], "Pipelines to time.")
flags.DEFINE_boolean("model", True, "Also time HDMLModel.train_on_batch at the same batch size.")
flags.DEFINE_string("backbone", "inception_v1_caffe", "Backbone of the timed model (random weights).")
flags.DEFINE_integer("model_steps", 5, "Timed train steps.")
flags.DEFINE_integer("model_warmup", 2, "Untimed train steps (tracing).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("json_out", str(REPO / "runs" / "benchmark_input.json"), "Where the results are written.")


def _time_model(batch, num_classes: int, crop: int) -> dict:
    """images/s of HDMLModel.train_on_batch on `batch`, or {'error': ...} when the model cannot run."""
    from hdml_tf.backbones import build_backbone
    from hdml_tf.config import HDMLConfig
    from hdml_tf.model import HDMLModel
    try:
        model = HDMLModel(build_backbone(FLAGS.backbone, crop), num_classes, HDMLConfig(loss=FLAGS.loss))
        model.compile()
        timing = benchmarking.time_train_steps(model, batch, FLAGS.model_warmup, FLAGS.model_steps)
    except Exception as e:  # report and keep the pipeline numbers
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    timing.pop("step_seconds")
    return dict(timing, backbone=FLAGS.backbone)


def run() -> dict:
    import tensorflow as tf

    from hdml_tf.data import pipeline, readers
    from hdml_tf.data.images import Augment

    crop = FLAGS.crop
    if crop is None:
        try:
            from hdml_tf.backbones import default_image_size
            crop = default_image_size(FLAGS.backbone)
        except Exception:
            crop = 227
    augment = Augment(resize=FLAGS.resize, crop=crop, flip=True)
    scratch = tempfile.TemporaryDirectory(prefix="hdml_bench_")
    dataset, data_dir = FLAGS.dataset, FLAGS.data_dir
    if data_dir is None:
        if DEFAULT_DATA.is_dir() and dataset == "cub200":
            data_dir = str(DEFAULT_DATA)
        else:
            data_dir = str(benchmarking.generate_image_folder(Path(scratch.name) / "generated"))
            why = f"{DEFAULT_DATA} absent" if dataset == "cub200" else f"no --data_dir for {FLAGS.dataset}"
            print(f"note: {why}; timing generated JPEGs in {data_dir}")
            dataset = "folder"
    train, _ = splits = readers.read_dataset(dataset, data_dir)
    print(splits.report.summary())
    cache_root = Path(FLAGS.cache_dir) if FLAGS.cache_dir else Path(scratch.name) / "cache"

    result = {"dataset": dataset, "data_dir": data_dir, "images": len(train), "classes": train.num_classes,
              "loss": FLAGS.loss, "batch_size": FLAGS.batch_size, "augment": dataclasses.asdict(augment),
              "cpu_cores": os.cpu_count(),
              "gpus": [d.name for d in tf.config.list_physical_devices("GPU")], "pipeline": {}}
    batch = None
    for mode in FLAGS.modes:
        cache = {"uncached": None, "memory": "memory", "disk": str(cache_root)}[mode]
        start = time.perf_counter()
        ds = pipeline.make_train_dataset(train, FLAGS.loss, FLAGS.batch_size, augment, FLAGS.seed, cache=cache)
        if mode == "disk":  # the first build fills the cache; time a second build that only reads it
            ds = pipeline.make_train_dataset(train, FLAGS.loss, FLAGS.batch_size, augment, FLAGS.seed, cache=cache,
                                             verbose=0)
        setup = time.perf_counter() - start
        timing = benchmarking.time_dataset(ds, FLAGS.batch_size, FLAGS.warmup, FLAGS.steps)
        timing["setup_s"] = round(setup, 2)
        result["pipeline"][mode] = timing
        print(f"pipeline {mode:9s}: {timing['images_per_s']:9.1f} images/s (setup {setup:.1f} s: scan or "
              f"cache fill)")
        if batch is None:
            batch = next(iter(ds))
        del ds

    if FLAGS.model:
        if batch is None:
            batch = next(iter(pipeline.make_train_dataset(train, FLAGS.loss, FLAGS.batch_size, augment, 0)))
        result["train_step"] = _time_model(batch, train.num_classes, crop)
        step = result["train_step"]
        if "error" in step:
            print(f"train step: not measured: {step['error']}")
        else:
            print(f"train step          : {step['images_per_s']:9.1f} images/s ({FLAGS.backbone}, "
                  f"B={FLAGS.batch_size})")
            cached = [result["pipeline"][m]["images_per_s"] for m in ("memory", "disk") if m in result["pipeline"]]
            if cached:
                result["ratio_cached_over_train"] = round(max(cached) / step["images_per_s"], 2)
                print(f"ratio cached pipeline / train step: {result['ratio_cached_over_train']:.2f} "
                      f"(target >= 2)")
            if "uncached" in result["pipeline"]:
                result["ratio_uncached_over_train"] = round(
                    result["pipeline"]["uncached"]["images_per_s"] / step["images_per_s"], 2)
    result["command"] = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    out = Path(FLAGS.json_out)
    benchmarking.write_json_atomic(out, result)
    print(f"wrote {out}")
    scratch.cleanup()
    return result


@common_flags.run_main
def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])} (flags start with --)")
    run()


if __name__ == "__main__":
    app.run(main, flags_parser=common_flags.parse_flags)
