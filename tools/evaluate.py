#!/usr/bin/env python
"""Evaluate a trained embedding on a data set split: a paper-style table in the terminal and a JSON file.

    python tools/evaluate.py --model=runs/demo                         # a training run directory (its test split)
    python tools/evaluate.py --model=runs/cub/hdml.keras --dataset=cub200 --data_dir=/data/CUB_200_2011
    python tools/evaluate.py --model=runs/cub/hdml.best.weights.h5 --data_dir=/data/CUB_200_2011   # selected ckpt
    python tools/evaluate.py --model=exported/cub --dataset=cub200 --data_dir=... --output_json=cub.json \
        --plots_dir=plots/cub

--model is one of:
- a training run's --output_dir (tools/train.py): <variant>.keras, else <variant>.weights.h5 (--variant);
  the run's results.json gives data set, data directory, image geometry and Recall@K when not given here;
- a `.keras` file (`hdml_tf.rundir.save_keras`, carries its geometry) or an HDMLModel `.weights.h5` (with the run's
  results.json beside it, e.g. <variant>.best.weights.h5, the checkpoint selected during training);
- a SavedModel directory written by tools/export.py (its preprocessing is in the graph).

Images get the evaluation geometry the model was trained with (square resize --resize, center crop --image_size;
0 = the model's). Metrics (hdml_tf.evaluation.evaluate, L2-normalized embeddings, a query never retrieves
itself): NMI and F1 of k-means as the official code scored them (k = the number of classes, best of
--kmeans_restarts=10 restarts, random_state 1; the line under the table names the protocol), Recall@K (--recall_ks),
MAP@R and R-Precision. --plots_dir writes tsne.png (a t-SNE map coloured by class) and retrieval.png (queries with their
nearest neighbours, correct ones framed green, wrong ones red). Errors print one line `error: ...` on stderr,
exit code 2.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

from hdml_tf.errors import HDMLError  # noqa: E402



def define_flags():
    """Flags of this tool; defined only when run as a program, so importing it has no side effects."""
    flags.DEFINE_string("model", None, "A training run directory, a .keras file, an HDMLModel .weights.h5 (with "
                        "results.json beside it) or a SavedModel directory (tools/export.py).")
    flags.DEFINE_enum("variant", "auto", ["auto", "hdml", "baseline"], "Which network of a run directory (auto: "
                      "hdml when present).")
    from hdml_tf.data import datasets
    flags.DEFINE_string("dataset", None, f"Data set ({', '.join(datasets.names())}); default: the run's.")
    flags.DEFINE_string("data_dir", None, "Where a photo data set is unpacked; default: the run's.")
    flags.DEFINE_enum("split", "test", ["test", "train"], "Which split: test (the unseen classes, as the paper) or "
                      "train.")
    flags.DEFINE_integer("image_size", 0, "Center crop fed to the network; 0 = what the model was trained with.")
    flags.DEFINE_integer("resize", 0, "Square resize before the crop; 0 = what the model was trained with.")
    flags.DEFINE_integer("batch_size", 64, "Images per batch while embedding.")
    flags.DEFINE_list("recall_ks", [], "K of Recall@K (default: the run's, else per data set: 1,2,4,8; SOP "
                      "1,10,100,1000); K >= the number of images is dropped.")
    flags.DEFINE_enum("kmeans", "auto", ["auto", "full", "minibatch"], "k-means for NMI/F1: full (Lloyd), "
                      "minibatch (large sets) or auto (minibatch above a size threshold).")
    flags.DEFINE_integer("kmeans_restarts", 10, "k-means restarts for NMI/F1, best inertia kept; 10 (random_state 1) "
                         "is the official protocol, fewer are faster (SOP) but biased low.")
    flags.DEFINE_bool("clustering", True, "Compute NMI and F1 (k-means; the slow part on large sets).")
    flags.DEFINE_integer("seed", 0, "t-SNE and retrieval-query seed (k-means keeps the official random_state 1).")
    flags.DEFINE_string("output_json", None, "JSON file to write (metrics, model, data, settings).")
    flags.DEFINE_string("plots_dir", None, "Write tsne.png and retrieval.png of the split here.")
    flags.DEFINE_integer("tsne_points", 2000, "Points on the t-SNE map (a seeded subset; ~1 min per 3,000 on 2 "
                         "cores).")
    flags.DEFINE_bool("progress", True, "Progress bar while embedding.")


# ------------------------------------------------------------------------------------------------ model
class LoadedModel:
    """The network to evaluate: `fn(images float32 [B, H, W, 3]) -> embeddings`, and how images must be prepared.

    Attributes:
      fn: callable (a Keras model or a SavedModel signature wrapper).
      source: the file or directory the weights came from.
      image_size, resize: the model's evaluation geometry (crop, square resize).
      crop_in_graph: True for a SavedModel (it resizes and crops itself: feed it the resized, uncropped images).
      run: the training run's results.json "run" section ({} when unknown).
    """

    def __init__(self, fn, source, image_size, resize, crop_in_graph=False, run=None, backbone=""):
        self.fn, self.source, self.image_size, self.resize = fn, source, int(image_size), int(resize)
        self.crop_in_graph, self.run, self.backbone = crop_in_graph, dict(run or {}), backbone


def load_model(path: str, variant: str = "auto", image_size: int = 0, resize: int = 0) -> LoadedModel:
    """Resolves --model (run directory, .keras, .weights.h5 or SavedModel) with `hdml_tf.rundir`."""
    from hdml_tf.rundir import find_checkpoint, load_checkpoint

    if not path:
        raise HDMLError("--model is required (a training run directory, a .keras or .weights.h5 file, or a "
                        "SavedModel directory)")
    if not os.path.exists(path):
        raise HDMLError(f"model {path} not found; expected a training run directory, a .keras or .weights.h5 file, "
                        "or a SavedModel directory")
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        return _load_saved_model(path, image_size, resize)
    ckpt = find_checkpoint(path, variant)
    model, info = load_checkpoint(ckpt, image_size=image_size, resize=resize)
    return LoadedModel(model, ckpt.path, info.image_size, info.resize, run=ckpt.run, backbone=info.backbone)


def _load_saved_model(path: str, image_size: int, resize: int) -> LoadedModel:
    import tensorflow as tf

    from hdml_tf.serving import SIGNATURE_IMAGES, read_export_info

    info = read_export_info(path)
    for name, given, own in (("image_size", image_size, info.image_size), ("resize", resize, info.resize)):
        if given and given != own:
            raise HDMLError(f"--{name}={given}: the SavedModel {path} has its preprocessing in the graph "
                            f"({name} {own}); leave --{name} at 0")
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures[SIGNATURE_IMAGES]

    def fn(images):
        return next(iter(signature(images=tf.cast(images, tf.float32)).values()))

    fn.loaded = loaded  # keeps the variables alive
    return LoadedModel(fn, path, info.image_size, info.resize, crop_in_graph=True, backbone=info.backbone)


# ------------------------------------------------------------------------------------------------ data
def resolve_data(source: str, run: dict, dataset=None, data_dir=None):
    """(dataset, data_dir): the flags, else the training run's; checked before the model is loaded."""
    from hdml_tf.data import datasets

    dataset = dataset or run.get("dataset")
    if not dataset:
        raise HDMLError(f"{source} carries no training run (results.json); pass --dataset (and --data_dir)")
    if datasets.get(dataset).embedded:
        return dataset, None
    if not data_dir:
        data_dir = run.get("data_dir") if run.get("dataset") == dataset else None
        if not data_dir:
            raise HDMLError(f"dataset={dataset} needs --data_dir (where its archive is unpacked)")
    if not os.path.isdir(data_dir):
        raise HDMLError(f"data_dir={data_dir} is not a directory")
    return dataset, data_dir


def _run_of(path: str, variant: str) -> dict:
    """The training run's results.json "run" section for --model ({} for a SavedModel or none), without TF."""
    if not path or not os.path.exists(path) or os.path.exists(os.path.join(path, "saved_model.pb")):
        return {}
    from hdml_tf.rundir import find_checkpoint
    return find_checkpoint(path, variant).run


def data_config(loaded: LoadedModel, dataset=None, data_dir=None, batch_size=64, recall_ks=()):
    """The RunConfig that loads and prepares the split (data set and directory default to the training run's)."""
    from hdml_tf.config import RunConfig

    dataset, data_dir = resolve_data(loaded.source, loaded.run, dataset, data_dir)
    ks = tuple(recall_ks) or (tuple(loaded.run.get("recall_ks") or ()) if loaded.run.get("dataset") == dataset
                              else ())
    # The crop is what the model takes; a SavedModel gets the resized images and crops them itself.
    crop = loaded.resize if loaded.crop_in_graph else loaded.image_size
    return RunConfig(dataset=dataset, data_dir=data_dir,
                     image_size=max(crop, 32), resize=loaded.resize, flip=False, eval_batch_size=batch_size,
                     recall_ks=ks, seed=int(loaded.run.get("seed", 0)), verbose=0)


def _ints(values, name):
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise HDMLError(f"--{name}={','.join(values)} must be a comma-separated list of integers")


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(model: str, *, variant="auto", dataset=None, data_dir=None, split="test", image_size=0, resize=0,
             batch_size=64, recall_ks=(), kmeans="auto", clustering=True, seed=0, output_json=None, plots_dir=None,
             tsne_points=2000, progress=True, printer=print, kmeans_restarts=10) -> dict:
    """Loads the model and the split, embeds, scores, prints the table, writes JSON and plots; returns the report."""
    from hdml_tf.evaluation import metrics
    from hdml_tf.evaluation.embedding import embed_dataset
    from hdml_tf.experiment import _fitting_ks, eval_dataset, load_splits

    if batch_size < 1:
        raise HDMLError(f"batch_size={batch_size} must be >= 1")
    if any(k < 1 for k in recall_ks):
        raise HDMLError(f"recall_ks={','.join(map(str, recall_ks))} must be positive")
    if kmeans_restarts < 1:
        raise HDMLError(f"kmeans_restarts={kmeans_restarts} must be >= 1 (10 is the official protocol)")
    if model and os.path.exists(model):  # bad data flags fail before the (slow) model load
        resolve_data(model, _run_of(model, variant), dataset, data_dir)
    loaded = load_model(model, variant, image_size, resize)
    run = data_config(loaded, dataset, data_dir, batch_size, recall_ks)
    image_set = load_splits(run)[0 if split == "train" else 1]
    printer(f"model: {loaded.source} ({loaded.backbone or 'unknown backbone'}; resize {loaded.resize}, crop "
            f"{loaded.image_size})")
    printer(f"data:  {run.dataset} {split}: {len(image_set):,} images of {image_set.num_classes} classes")
    start = time.time()
    embeddings, labels = embed_dataset(loaded.fn, eval_dataset(run, image_set), progress=progress)
    embed_seconds = time.time() - start
    if len(labels) < 2:
        raise HDMLError(f"{run.dataset} {split} has {len(labels)} readable images; need at least 2")
    ks = _fitting_ks(run.ks(), labels)
    start = time.time()
    try:
        results = metrics.evaluate(embeddings, labels, ks, clustering=clustering, kmeans=kmeans,
                                   n_init=kmeans_restarts)
    except ValueError as e:
        raise HDMLError(f"cannot score {run.dataset} {split}: {e}")
    metric_seconds = time.time() - start
    name = os.path.basename(os.path.normpath(loaded.source))
    protocol = (metrics.clustering_protocol(len(set(labels.tolist())), n_init=kmeans_restarts, kmeans=kmeans)
                if clustering else None)
    printer(metrics.format_results({name: results}, protocol=protocol))
    printer(f"embedding {embed_seconds:.1f} s, metrics {metric_seconds:.1f} s")
    report = {
        "model": os.path.abspath(model), "weights": os.path.abspath(loaded.source), "backbone": loaded.backbone,
        "dataset": run.dataset, "data_dir": run.data_dir, "split": split, "num_images": int(len(labels)),
        "num_classes": int(len(set(labels.tolist()))), "embedding_size": int(embeddings.shape[1]),
        "image_size": loaded.image_size, "resize": loaded.resize, "recall_ks": list(ks), "kmeans": kmeans,
        "kmeans_restarts": kmeans_restarts, "kmeans_seed": metrics.OFFICIAL_KMEANS_SEED,
        "clustering_protocol": protocol, "seed": seed, "metrics": {k: float(v) for k, v in results.items()},
        "embed_seconds": round(embed_seconds, 2), "metric_seconds": round(metric_seconds, 2)}
    if plots_dir:
        report["plots"] = write_plots(plots_dir, embeddings, labels, image_set, run, seed, tsne_points,
                                      f"{name}: {run.dataset} {split}")
        printer("plots: " + ", ".join(report["plots"].values()))
    if output_json:
        folder = os.path.dirname(os.path.abspath(output_json))
        os.makedirs(folder, exist_ok=True)
        with open(output_json, "w") as f:
            json.dump(report, f, indent=2)
        printer(f"wrote {output_json}")
    return report


def write_plots(plots_dir, embeddings, labels, image_set, run, seed, tsne_points, title) -> dict:
    """tsne.png and retrieval.png; thumbnails when the embedded images line up with the split's images."""
    import numpy as np

    from hdml_tf.evaluation.plots import plot_retrieval, plot_tsne

    os.makedirs(plots_dir, exist_ok=True)
    images = _thumbnails(image_set, run) if len(labels) == len(image_set) else None
    paths = {"tsne": os.path.join(plots_dir, "tsne.png"), "retrieval": os.path.join(plots_dir, "retrieval.png")}
    plot_tsne(embeddings, labels, paths["tsne"], images=images, max_points=min(tsne_points, len(labels)), seed=seed,
              title=f"t-SNE, {title}")
    if images is None:  # some files were unreadable: positions no longer match, draw labelled placeholders
        blank = np.full((32, 32, 3), 200, np.uint8)
        images = lambda i: blank  # noqa: E731
        logging.warning("some images were unreadable; the retrieval grid shows placeholders")
    names = list(image_set.class_names) if image_set.class_names is not None else None
    plot_retrieval(images, embeddings, labels, paths["retrieval"], k=min(5, len(labels) - 1), seed=seed,
                   class_names=names)
    return paths


def _thumbnails(image_set, run):
    """image i as uint8 [H, W, 3]: in-memory images directly, files decoded and shrunk on demand."""
    if image_set.images is not None:
        return image_set.images
    import tensorflow as tf

    from hdml_tf.data.images import decode_rgb, resize_square

    def get(i):
        image = decode_rgb(tf.io.read_file(image_set.paths[i]))
        return resize_square(image[tf.newaxis], 96)[0].numpy()
    return get


def main(argv):
    if len(argv) > 1:
        raise HDMLError(f"unexpected arguments {' '.join(argv[1:])} (flags start with --)")
    f = flags.FLAGS
    evaluate(f.model, variant=f.variant, dataset=f.dataset, data_dir=f.data_dir, split=f.split,
             image_size=f.image_size, resize=f.resize, batch_size=f.batch_size,
             recall_ks=_ints(f.recall_ks, "recall_ks"), kmeans=f.kmeans, clustering=f.clustering, seed=f.seed,
             output_json=f.output_json, plots_dir=f.plots_dir, tsne_points=f.tsne_points, progress=f.progress,
             kmeans_restarts=f.kmeans_restarts)
    return 0


if __name__ == "__main__":
    import common_flags
    define_flags()
    app.run(common_flags.run_main(main), flags_parser=common_flags.parse_flags)
