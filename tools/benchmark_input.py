"""Input pipeline speed (images/s; uncached, memory cache, disk cache) beside the train step's consumption.

    python tools/benchmark_input.py                                  # ../shared/data/cub200_subset, or generated
    python tools/benchmark_input.py --dataset cub200 --data_dir ~/data/CUB_200_2011 --batch_size 128
    python tools/benchmark_input.py --model=false                    # pipeline only

The pipeline is timed alone (batches pulled as fast as possible, after `--warmup` batches). The train step is timed
on one fixed batch already in memory (`HDMLModel.train_on_batch`, after `--model_warmup` calls, so tracing is
excluded). `ratio` = cached pipeline images/s / train step images/s; the issue's target is >= 2. Results are printed
and written as JSON (`--json_out`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cub200_subset"

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "cub200", "Reader name (hdml_tf.data.readers.READERS): cub200, cars196, sop, folder.")
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


def _generated_folder(root: Path, classes: int = 16, per_class: int = 24) -> Path:
    """Writes classes x per_class JPEGs (320x400, smooth random patterns) as a class-folder tree."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            small = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            image = tf.cast(tf.image.resize(small, [320, 400]), tf.uint8)
            tf.io.write_file(str(folder / f"{i:03d}.jpg"), tf.io.encode_jpeg(image, quality=90))
    return root


def _time_pipeline(dataset, batch_size: int, warmup: int, steps: int) -> dict:
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        images, _ = next(iterator)
    _ = images.numpy()  # the batch is materialized
    seconds = time.perf_counter() - start
    return {"images_per_s": round(steps * batch_size / seconds, 1), "seconds": round(seconds, 3),
            "steps": steps}


def _time_model(train, batch, num_classes: int, crop: int) -> dict:
    """images/s of HDMLModel.train_on_batch on `batch`, or {'error': ...} when the model cannot run."""
    try:
        from hdml_tf.backbones import build_backbone
        from hdml_tf.config import HDMLConfig
        from hdml_tf.model import HDMLModel
    except ImportError as e:
        return {"error": f"hdml_tf.model.HDMLModel is not importable yet ({e})"}
    images, labels = batch
    try:
        model = HDMLModel(build_backbone(FLAGS.backbone, crop), num_classes, HDMLConfig(loss=FLAGS.loss))
        model.compile()
        for _ in range(FLAGS.model_warmup):
            model.train_on_batch(images, labels)
        start = time.perf_counter()
        for _ in range(FLAGS.model_steps):
            logs = model.train_on_batch(images, labels, return_dict=True)
        float(logs["loss"])  # waits for the last step
        seconds = time.perf_counter() - start
    except Exception as e:  # report and keep the pipeline numbers
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    return {"images_per_s": round(FLAGS.model_steps * len(labels) / seconds, 1), "seconds": round(seconds, 3),
            "steps": FLAGS.model_steps, "backbone": FLAGS.backbone}


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
            data_dir = str(_generated_folder(Path(scratch.name) / "generated"))
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
        timing = _time_pipeline(ds, FLAGS.batch_size, FLAGS.warmup, FLAGS.steps)
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
        result["train_step"] = _time_model(train, batch, train.num_classes, crop)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    scratch.cleanup()
    return result


def main(argv):
    del argv
    from hdml_tf.errors import HDMLError
    try:
        run()
    except HDMLError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
