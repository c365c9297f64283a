"""One training run end to end: data → model → `model.fit` → metrics on the unseen test classes.

`tools/train.py`, `tools/reproduce.py` and the benchmarks parse their flags into a `RunConfig` (plus the method's
`HDMLConfig` and the optimizers' `OptimConfig`) and call the functions here; nothing here reads flags.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from hdml_tf.config import ConfigError, HDMLConfig, OptimConfig
from hdml_tf.data.image_set import ImageSet
from hdml_tf.evaluation.metrics import OFFICIAL_KMEANS_RESTARTS, clustering_protocol, format_results

log = logging.getLogger(__name__)

#: Data sets whose images ship with the installed packages (no --data_dir).
EMBEDDED = ("glyphs", "digits")
PHOTO_DATASETS = ("cub200", "cars196", "sop", "folder")
#: Recall@K reported per data set (paper: 1,2,4,8 for CUB/Cars, 1,10,100 for SOP; plus larger K where they fit).
DEFAULT_RECALL_KS = {"sop": (1, 10, 100, 1000)}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What to train on and for how long (the method itself is HDMLConfig).

    Attributes:
      dataset: "glyphs" (default, embedded), "digits" (embedded), "cub200", "cars196", "sop" or "folder".
      data_dir: where a photo data set is unpacked (not used by the embedded ones).
      backbone: "inception_v1_slim", "inception_v1_caffe" or "resnet50".
      image_size: crop fed to the backbone; 0 = 64 for the embedded sets, else the backbone's (227 / 224).
      resize: side of the square images are resized to before cropping; 0 = image_size for the embedded sets,
        256 for photos (official).
      flip: random horizontal flips; None = on for photos, off for glyphs/digits (mirrored letters are other
        classes).
      weights: ImageNet weights file for the backbone (None trains from scratch).
      caffe_lrn: Caffe's own LRN instead of the official code's (inception_v1_caffe only).
      batch_size: global batch in the tuple layout of the loss.
      steps: optimizer steps.
      steps_per_epoch: steps per Keras epoch (progress bar, logs, evaluation granularity).
      eval_every_epochs: evaluate every k epochs during training (0: only at the end) with
        `hdml_tf.evaluation.EvaluationCallback`: the test classes, or the validation classes with
        `validation_fraction`; `val_*` metrics in the Keras logs, eval_<variant>.csv and the best weights by
        `monitor` (<variant>.best.weights.h5); the last and the selected checkpoint are both scored on the test classes.
      validation_fraction: > 0 holds this share of the TRAINING classes out as a validation split for model
        selection (`split_validation_classes`, the fair protocol); the test classes are then only scored at the
        end. Needs eval_every_epochs > 0.
      monitor: metric that selects the best checkpoint ("recall@1", "nmi", "map@r", ...; a "val_" prefix is
        accepted); higher is better.
      eval_batch_size: rows per batch when embedding.
      recall_ks: K of Recall@K (empty: per data set default).
      kmeans_restarts: k-means restarts behind NMI/F1 (the best inertia is kept); 10 with random_state 1 is the
        official protocol, fewer trade a biased-low, noisier NMI/F1 for time (SOP's 11,316 clusters).
      seed: seeds sampling, augmentation and initialization.
      output_dir: results.json, history.csv, curves.png, the trained weights.
      cache: None, "memory" or a directory for decoded images (photo data sets).
      strict_images: an unreadable image stops the run instead of being skipped and reported.
      verbose: Keras verbosity (1 = progress bar).
      checkpoint_dir: where training checkpoints go (one sub-directory per variant, "hdml" / "baseline"); a run
        started again with the same checkpoint_dir resumes from the newest readable checkpoint. None: no
        checkpoints, no resume.
      checkpoint_every: steps between checkpoints (0: only at the end and on SIGTERM).
      keep_checkpoints: newest checkpoints kept per variant.
      deterministic: seeds everything and enables TensorFlow op determinism: equal runs give equal weights,
        and so does a run interrupted and resumed (slower on GPU).
      max_bad_steps: training stops after this many consecutive steps with a NaN/Inf loss or gradient (each is
        skipped: no update); 0: never stop.
      strategy: "default" (one device), "mirrored" (every GPU of this machine) or "multi_worker" (every GPU of
        every machine listed in TF_CONFIG). batch_size stays the GLOBAL batch: losses and synthesis see all of it
        (hdml_tf/distribute.py); it must split evenly over the replicas.
      mixed_precision: "float32", "float16" (dynamic loss scaling on all three optimizers) or "bfloat16" compute
        for the backbone; metric head, generator, classifier, losses, distances and synthesis stay float32.
    """

    dataset: str = "glyphs"
    data_dir: Optional[str] = None
    backbone: str = "inception_v1_slim"
    image_size: int = 0
    resize: int = 0
    flip: Optional[bool] = None
    weights: Optional[str] = None
    caffe_lrn: bool = False
    batch_size: int = 128
    steps: int = 8000
    steps_per_epoch: int = 500
    eval_every_epochs: int = 0
    validation_fraction: float = 0.0
    monitor: str = "recall@1"
    eval_batch_size: int = 64
    recall_ks: Tuple[int, ...] = ()
    kmeans_restarts: int = OFFICIAL_KMEANS_RESTARTS
    seed: int = 0
    output_dir: str = "runs/default"
    cache: Optional[str] = None
    strict_images: bool = False
    verbose: int = 1
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    deterministic: bool = False
    max_bad_steps: int = 20
    strategy: str = "default"
    mixed_precision: str = "float32"
    jit_compile: str = "auto"

    def __post_init__(self):
        from hdml_tf.backbones import BACKBONES
        if self.dataset not in EMBEDDED + PHOTO_DATASETS:
            raise ConfigError(f"dataset={self.dataset!r} is unknown; expected one of "
                              f"{', '.join(EMBEDDED + PHOTO_DATASETS)}")
        if self.dataset in PHOTO_DATASETS and not self.data_dir:
            raise ConfigError(f"dataset={self.dataset} needs --data_dir (where its archive is unpacked)")
        if self.data_dir and self.dataset in PHOTO_DATASETS and not os.path.isdir(self.data_dir):
            raise ConfigError(f"data_dir={self.data_dir} is not a directory")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone={self.backbone!r} is unknown; expected one of {', '.join(BACKBONES)}")
        if self.weights and self.weights != "imagenet" and not os.path.exists(self.weights) and not (
                os.path.exists(self.weights + ".index")):
            raise ConfigError(f"weights={self.weights} does not exist")
        for name in ("steps", "steps_per_epoch", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        if self.image_size and self.image_size < 32:
            raise ConfigError(f"image_size={self.image_size} must be >= 32 (or 0 for the default)")
        if any(k <= 0 for k in self.recall_ks):
            raise ConfigError(f"recall_ks={self.recall_ks} must be positive")
        if self.kmeans_restarts < 1:
            raise ConfigError(f"kmeans_restarts={self.kmeans_restarts} must be >= 1 (10 is the official protocol)")
        _check_fault_tolerance(self)
        _check_distribution(self)
        _check_selection(self)

    @property
    def embedded(self) -> bool:
        return self.dataset in EMBEDDED

    def crop_size(self) -> int:
        from hdml_tf.backbones import default_image_size
        return self.image_size or (64 if self.embedded else default_image_size(self.backbone))

    def augment(self):
        from hdml_tf.data.images import Augment
        crop = self.crop_size()
        resize = self.resize or (crop if self.embedded else max(256, crop))
        flip = (not self.embedded) if self.flip is None else self.flip
        return Augment(resize=resize, crop=crop, flip=flip)

    def ks(self) -> Tuple[int, ...]:
        return tuple(self.recall_ks) or DEFAULT_RECALL_KS.get(self.dataset, (1, 2, 4, 8))


def _check_fault_tolerance(run: RunConfig) -> None:
    """Validates the checkpoint / determinism / NaN-guard fields of a RunConfig."""
    for name, low in (("checkpoint_every", 0), ("keep_checkpoints", 1), ("max_bad_steps", 0)):
        if getattr(run, name) < low:
            raise ConfigError(f"{name}={getattr(run, name)} must be >= {low}")


def _check_selection(run: RunConfig) -> None:
    """Validates eval_every_epochs / validation_fraction / monitor."""
    if run.eval_every_epochs < 0:
        raise ConfigError(f"eval_every_epochs={run.eval_every_epochs} must be >= 0")
    if not 0.0 <= run.validation_fraction < 1.0:
        raise ConfigError(f"validation_fraction={run.validation_fraction} must lie in [0, 1)")
    if run.validation_fraction > 0 and run.eval_every_epochs <= 0:
        raise ConfigError(f"validation_fraction={run.validation_fraction} selects a checkpoint on the validation "
                          "classes; it needs eval_every_epochs > 0")
    choices = ["nmi", "f1", "map@r", "r_precision"] + [f"recall@{k}" for k in run.ks()]
    if _monitor_key(run.monitor) not in choices:
        raise ConfigError(f"monitor={run.monitor!r} is not computed; choose one of {', '.join(choices)}")


def _monitor_key(monitor: str) -> str:
    return monitor[len("val_"):] if monitor.startswith("val_") else monitor


def _check_distribution(run: RunConfig) -> None:
    """Validates the strategy / mixed_precision fields of a RunConfig."""
    from hdml_tf.distribute import PRECISIONS, STRATEGIES
    if run.strategy not in STRATEGIES:
        raise ConfigError(f"strategy={run.strategy!r} is unknown; expected one of {', '.join(STRATEGIES)}")
    if run.mixed_precision not in PRECISIONS:
        raise ConfigError(f"mixed_precision={run.mixed_precision!r} is unknown; expected one of "
                          f"{', '.join(PRECISIONS)}")


# ------------------------------------------------------------------------------------------------ data
def load_splits(run: RunConfig) -> Tuple[ImageSet, ImageSet]:
    """(train, test) ImageSets of the zero-shot split (test classes unseen in training)."""
    if run.dataset == "glyphs":
        from hdml_tf.data.glyphs import load_glyphs
        return tuple(load_glyphs(image_size=run.resize or run.crop_size(), seed=run.seed))
    if run.dataset == "digits":
        from hdml_tf.data.digits import load_digits
        return tuple(load_digits(image_size=run.resize or run.crop_size(), seed=run.seed))
    from hdml_tf.data.readers import read_dataset
    splits = read_dataset(run.dataset, run.data_dir)
    report = getattr(splits, "report", None)
    if report is not None:
        (log.warning if report.partial else log.info)(report.summary())
    return splits[0], splits[1]


def train_dataset(run: RunConfig, hdml: HDMLConfig, train: ImageSet, start_step: int = 0) -> tf.data.Dataset:
    from hdml_tf.data.pipeline import make_train_dataset
    return make_train_dataset(train, hdml.loss, run.batch_size, run.augment(), seed=run.seed, cache=run.cache,
                              start_step=start_step, strict_images=run.strict_images, verbose=run.verbose)


def eval_dataset(run: RunConfig, image_set: ImageSet) -> tf.data.Dataset:
    from hdml_tf.data.pipeline import make_eval_dataset
    return make_eval_dataset(image_set, run.eval_batch_size, run.augment(), cache=run.cache,
                             strict_images=run.strict_images, verbose=0)


# ------------------------------------------------------------------------------------------------ model
def build_model(run: RunConfig, hdml: HDMLConfig, optim: OptimConfig, num_classes: int):
    """HDMLModel with its backbone (and ImageNet weights if given), compiled with the three optimizers; built in
    `run.mixed_precision` under the scope of `run.strategy` (variables mirrored on every replica)."""
    from hdml_tf import distribute
    distribute.set_mixed_precision(run.mixed_precision)
    with distribution_strategy(run).scope():
        return _build_model(run, hdml, optim, num_classes)


def _build_model(run: RunConfig, hdml: HDMLConfig, optim: OptimConfig, num_classes: int):
    from hdml_tf import distribute
    from hdml_tf.backbones import build_backbone
    from hdml_tf.model import HDMLModel, make_optimizers
    keras.utils.set_random_seed(run.seed)
    if not run.weights:
        log.warning("training %s from random initialization: the paper's numbers need ImageNet weights "
                    "(--weights, see README 'ImageNet weights')", run.backbone)
    backbone = build_backbone(run.backbone, run.crop_size(), weights=run.weights, caffe_lrn=run.caffe_lrn)
    model = HDMLModel(backbone, num_classes, hdml)
    model.compile(**distribute.loss_scale_optimizers(make_optimizers(optim, hdml=hdml.hdml), run.mixed_precision),
                  jit_compile=use_xla(run.jit_compile))
    return model


def use_xla(jit_compile: str) -> bool:
    """"true"/"false", or "auto": XLA on a GPU, off on a CPU.

    tools/benchmark.py measured XLA at 0.65x (baseline) and 0.73x (HDML) the speed of plain graphs on the 2-core
    CPU, after 6-10 minutes of compilation; on GPUs fusing the generator and head passes is expected to pay, but
    that is not measured here (README, Benchmarks): run the benchmark and pass --jit_compile explicitly to be sure.
    """
    if jit_compile not in ("auto", "true", "false"):
        raise ConfigError(f"jit_compile={jit_compile!r} must be auto, true or false")
    if jit_compile == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return jit_compile == "true"


def distribution_strategy(run: RunConfig) -> tf.distribute.Strategy:
    """The tf.distribute strategy of `run.strategy` (created once per process)."""
    from hdml_tf import distribute
    return distribute.get_strategy(run.strategy)


def distributed_train_dataset(model, run: RunConfig, hdml: HDMLConfig, train: ImageSet,
                              start_step: int = 0):
    """`train_dataset` split over the replicas of the model's strategy so that the losses see exactly the global
    batch a single device would (the plain dataset under the default strategy)."""
    from hdml_tf import distribute
    return distribute.distribute_dataset(model.distribute_strategy,
                                         lambda: train_dataset(run, hdml, train, start_step=start_step))


def _per_worker_output(run: RunConfig, strategy) -> RunConfig:
    """Multi-worker: every worker runs the same command in lockstep; the chief writes into output_dir (and
    checkpoint_dir), the other workers into a `worker_<index>` sub-directory, so no two write the same file."""
    from hdml_tf import distribute
    if distribute.is_chief(strategy):
        return run
    sub = f"worker_{strategy.cluster_resolver.task_id}"
    return dataclasses.replace(
        run, output_dir=str(Path(run.output_dir) / sub),
        checkpoint_dir=str(Path(run.checkpoint_dir) / sub) if run.checkpoint_dir else None)


# ------------------------------------------------------------------------------------------------ metrics
def evaluate_model(model, dataset: tf.data.Dataset, ks: Sequence[int], progress: bool = False,
                   kmeans_restarts: int = OFFICIAL_KMEANS_RESTARTS) -> Dict[str, float]:
    """NMI, F1 (official k-means protocol with `kmeans_restarts` restarts), Recall@K, MAP@R of a model's
    embeddings of an evaluation dataset."""
    from hdml_tf.evaluation.embedding import embed_dataset
    from hdml_tf.evaluation.metrics import evaluate
    embeddings, labels = embed_dataset(model, dataset, progress=progress)
    return evaluate(embeddings, labels, recall_ks=_fitting_ks(ks, labels), n_init=kmeans_restarts)


#: Raw pixels are clustered in this many principal components (k-means in 12,288-d pixel space took ~60 s for the
#: 4,224 glyph test images on 2 cores; the leading components carry the distances k-means works with).
RAW_PIXEL_CLUSTER_DIMS = 256


def evaluate_raw_pixels(dataset: tf.data.Dataset, ks: Sequence[int],
                        kmeans_restarts: int = OFFICIAL_KMEANS_RESTARTS) -> Dict[str, float]:
    """The same metrics with the flattened, centred, L2-normalized pixels as the embedding (what training must beat).

    Recall@K and MAP@R use the full pixel vectors; NMI and F1 cluster their projection on the leading
    RAW_PIXEL_CLUSTER_DIMS principal components (scikit-learn PCA, seeded), which keeps k-means to seconds.
    """
    from sklearn.decomposition import PCA

    from hdml_tf.evaluation.embedding import embed_dataset
    from hdml_tf.evaluation.metrics import evaluate, nmi_f1

    def pixels(images):
        flat = tf.reshape(tf.cast(images, tf.float32), [tf.shape(images)[0], -1])
        return tf.math.l2_normalize(flat - tf.reduce_mean(flat, axis=1, keepdims=True), axis=1)

    embeddings, labels = embed_dataset(pixels, dataset, progress=False)
    results = evaluate(embeddings, labels, recall_ks=_fitting_ks(ks, labels), clustering=False)
    dims = min(RAW_PIXEL_CLUSTER_DIMS, embeddings.shape[1], len(embeddings))
    projected = PCA(n_components=dims, random_state=0).fit_transform(embeddings)
    results["nmi"], results["f1"] = nmi_f1(projected, labels, n_init=kmeans_restarts)
    return results


def _fitting_ks(ks, labels):
    """Recall@K needs K < N (a query never retrieves itself)."""
    return tuple(k for k in ks if k < len(labels)) or (1,)


# ------------------------------------------------------------------------------------------------ run
def fit(model, run: RunConfig, hdml: HDMLConfig, train: ImageSet, callbacks: Sequence = (),
        initial_step: int = 0) -> keras.callbacks.History:
    """`model.fit` up to global step `run.steps`, in epochs of `run.steps_per_epoch`; resumable.

    With `run.checkpoint_dir`, the newest readable checkpoint of this variant is restored first (model, the three
    optimizers, J_avg / J_gen, step counter) and training goes on from its step: the sampler continues at that
    batch (`start_step`) and the learning-rate schedule at the restored `optimizer.iterations`. Checkpoints are
    written every `run.checkpoint_every` steps, at the end and on SIGTERM. After a mid-epoch resume Keras counts
    epochs from the resume point; the global step, and so the weights, are those of an uninterrupted run.

    Raises:
      TrainingInterrupted: SIGTERM stopped training (after saving a checkpoint); run again to resume.
      TrainingDiverged: `run.max_bad_steps` consecutive steps had NaN/Inf losses or gradients.
      CheckpointError: checkpoint_dir holds checkpoints, none readable or of another model.
      ConfigError: the model's classifier has fewer outputs than the training split has classes.
    """
    from hdml_tf.callbacks import SaveOnSignal, TrainingInterrupted
    check_num_classes(model, train)
    if run.deterministic:
        tf.config.experimental.enable_op_determinism()
    manager = checkpoint_manager(run, hdml)
    if manager is not None:
        restored = manager.restore(model)
        initial_step = initial_step if restored is None else restored
    if initial_step >= run.steps:
        log.info("training already reached step %d of %d (checkpoint in %s); nothing left to train", initial_step,
                 run.steps, manager.directory if manager else "-")
        return keras.callbacks.History()
    safety = fault_tolerance_callbacks(run, manager, initial_step)
    from hdml_tf.evaluation.callback import EvaluationCallback
    for cb in callbacks:
        if isinstance(cb, EvaluationCallback) and cb.step < initial_step:
            cb.step = cb._epoch_start_step = initial_step  # a resumed run counts evaluation steps globally
    epochs = -(-run.steps // run.steps_per_epoch)
    ds = distributed_train_dataset(model, run, hdml, train, start_step=initial_step)
    try:
        history = model.fit(ds, epochs=epochs, steps_per_epoch=min(run.steps_per_epoch, run.steps),
                            initial_epoch=initial_step // run.steps_per_epoch, callbacks=safety + list(callbacks),
                            verbose=run.verbose)
    finally:
        for cb in safety:
            if isinstance(cb, SaveOnSignal):
                cb.restore_handlers()
    for cb in safety:
        if isinstance(cb, SaveOnSignal) and cb.interrupted is not None:
            raise TrainingInterrupted(cb.message, cb.interrupted)
    return history


def enable_determinism(seed: int) -> None:
    """Seeds Python, NumPy, TensorFlow and Keras, and makes TensorFlow ops deterministic (global, irreversible)."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def check_num_classes(model, train: ImageSet) -> None:
    """The softmax classifier needs an output per training class: a label >= its size gives NaN losses on a GPU
    (TensorFlow's sparse cross-entropy returns NaN rows there) and an error on a CPU."""
    classes = getattr(model, "num_classes", None)
    if getattr(model, "classifier_net", None) is not None and classes is not None and train.num_classes > classes:
        raise ConfigError(f"the training split {train.name or ''} has {train.num_classes} classes but the model's "
                          f"softmax classifier has {classes} outputs; build the model with "
                          f"num_classes={train.num_classes}")


def checkpoint_manager(run: RunConfig, hdml: HDMLConfig):
    """CheckpointManager of this variant (checkpoint_dir/hdml or /baseline), or None without checkpoint_dir."""
    if not run.checkpoint_dir:
        return None
    from hdml_tf.checkpointing import CheckpointManager
    return CheckpointManager(Path(run.checkpoint_dir) / ("hdml" if hdml.hdml else "baseline"),
                             keep=run.keep_checkpoints)


def fault_tolerance_callbacks(run: RunConfig, manager, initial_step: int) -> List[keras.callbacks.Callback]:
    """Step limit, NaN guard, and with a checkpoint manager periodic checkpoints and save-on-SIGTERM (in this order:
    the guard raises before a checkpoint of a diverged step could be written)."""
    from hdml_tf.callbacks import NonFiniteGuard, PeriodicCheckpoint, SaveOnSignal, StopAtStep
    found = [StopAtStep(run.steps, initial_step), NonFiniteGuard(run.max_bad_steps, initial_step, manager)]
    if manager is not None:
        checkpoint = PeriodicCheckpoint(manager, run.checkpoint_every, initial_step)
        found += [checkpoint, SaveOnSignal(checkpoint, initial_step=initial_step)]
    return found


def run_experiment(run: RunConfig, hdml: HDMLConfig, optim: OptimConfig, *, compare_baseline: bool = False,
                   callbacks: Sequence = (), printer=print) -> Dict:
    """Trains HDML (and the plain baseline when asked) and scores raw pixels, the untrained and the trained network.

    Writes into run.output_dir: results.json, history_<variant>.csv, curves_<variant>.png, <variant>.weights.h5 and
    <variant>.keras (the last weights; `hdml_tf.export.load_keras`, tools/export.py and tools/evaluate.py read it).
    With `run.eval_every_epochs` > 0 also eval_<variant>.csv (one row per evaluation), eval_<variant>.json (best
    and last), <variant>.best.weights.h5 (best by `run.monitor`) and TensorBoard scalars under logs/<variant>;
    results["test"] then holds the last checkpoint as "<variant>" and the selected one as
    "<variant> (best val_<monitor> at step N)", and results["selection"][<variant>] says how it was selected.
    Returns the results dict (also in results.json).
    """
    hdml.check_batch_size(run.batch_size)
    from hdml_tf import distribute
    strategy = distribution_strategy(run)  # first: MultiWorkerMirroredStrategy must precede other TF ops
    distribute.check_global_batch(strategy, run.batch_size, hdml.loss)
    run = _per_worker_output(run, strategy)
    if run.deterministic:
        enable_determinism(run.seed)
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_splits(run)
    printer(f"data: {run.dataset}: {len(train):,} training images of {train.num_classes} classes, "
            f"{len(test):,} test images of {test.num_classes} unseen classes; crop {run.crop_size()} px")
    val = None
    if run.validation_fraction > 0:
        from hdml_tf.evaluation.callback import split_validation_classes
        try:
            train, val = split_validation_classes(train, run.validation_fraction, seed=run.seed)
        except ValueError as e:
            raise ConfigError(f"validation_fraction={run.validation_fraction}: {e}")
        printer(f"model selection on {len(val):,} validation images of {val.num_classes} training classes held "
                f"out (training on the other {train.num_classes})")
    printer(distribute.describe(strategy, run.batch_size, hdml.loss) + f"; {run.mixed_precision} compute")
    test_ds = eval_dataset(run, test)
    ks = run.ks()
    results = {"run": dataclasses.asdict(run), "method": dataclasses.asdict(hdml),
               "optim": dataclasses.asdict(optim), "test": {}}
    results["test"]["raw_pixels"] = evaluate_raw_pixels(test_ds, ks, run.kmeans_restarts)
    variants = [("hdml" if hdml.hdml else "baseline", hdml)]
    if compare_baseline and hdml.hdml:
        variants.append(("baseline", dataclasses.replace(hdml, hdml=False)))
    for name, cfg in variants:
        model = build_model(run, cfg, optim, train.num_classes)
        if "untrained" not in results["test"]:
            results["test"]["untrained"] = evaluate_model(model, test_ds, ks, kmeans_restarts=run.kmeans_restarts)
        printer(f"training {name}: {cfg.loss} loss, {run.backbone}, batch {run.batch_size}, {run.steps} steps")
        selector = _evaluation_callback(run, name, val if val is not None else test, out)
        start = time.time()
        history = fit(model, run, cfg, train, ([selector] if selector else []) + list(callbacks))
        seconds = time.time() - start
        results["test"][name] = evaluate_model(model, test_ds, ks, kmeans_restarts=run.kmeans_restarts)
        results.setdefault("train_seconds", {})[name] = round(seconds, 1)
        _write_history(history.history, out / f"history_{name}.csv")
        _plot_curves(out / f"history_{name}.csv", out / f"curves_{name}.png")
        model.save_weights(str(out / f"{name}.weights.h5"))
        _save_keras(model, run, out / f"{name}.keras")
        if selector is not None and selector.best is not None:
            _score_selected(model, run, name, selector, test_ds, ks, results, out)
    results["clustering_protocol"] = clustering_protocol(test.num_classes, n_init=run.kmeans_restarts)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=2, default=float)
    rows = dict(results["test"])
    for name in results.get("selection", {}):  # the last checkpoint is named as such
        rows = {(f"{k} (last)" if k == name else k): v for k, v in rows.items()}
    printer(format_results(rows, protocol=results["clustering_protocol"]))
    return results


def _evaluation_callback(run: RunConfig, name: str, image_set: ImageSet, out: Path):
    """EvaluationCallback on `image_set` every `run.eval_every_epochs` epochs (None when 0)."""
    if run.eval_every_epochs <= 0:
        return None
    from hdml_tf.evaluation.callback import EvaluationCallback
    ks = _fitting_ks(run.ks(), image_set.labels)
    monitor = _monitor_key(run.monitor)
    if monitor.startswith("recall@") and int(monitor.split("@")[1]) not in ks:
        raise ConfigError(f"monitor={run.monitor!r}: the evaluation split {image_set.name} has only {len(image_set)} "
                          f"images; Recall@K needs K < that")
    return EvaluationCallback(
        eval_dataset(run, image_set), every_n_epochs=run.eval_every_epochs, monitor=monitor, recall_ks=ks,
        n_init=run.kmeans_restarts, best_weights_path=str(out / f"{name}.best.weights.h5"),
        csv_path=str(out / f"eval_{name}.csv"), log_dir=str(out / "logs" / name),
        summary_path=str(out / f"eval_{name}.json"), verbose=int(run.verbose > 0))


def _save_keras(model, run: RunConfig, path: Path) -> None:
    from hdml_tf.export import save_keras
    save_keras(model, str(path), image_size=run.crop_size(), resize=run.augment().resize, backbone=run.backbone)


def _score_selected(model, run: RunConfig, name: str, selector, test_ds, ks, results: Dict, out: Path) -> None:
    """Scores the checkpoint `selector` selected on the test classes (the model keeps the last weights)."""
    best, last = selector.best, selector.last
    monitor = selector.prefix + selector.monitor
    row = f"{name} (best {monitor} at step {best['step']})"
    if best["step"] == last["step"]:
        results["test"][row] = dict(results["test"][name])  # the last checkpoint is the selected one
    else:
        model.load_weights(selector.best_weights_path)
        results["test"][row] = evaluate_model(model, test_ds, ks, kmeans_restarts=run.kmeans_restarts)
        model.load_weights(str(out / f"{name}.weights.h5"))
    results.setdefault("selection", {})[name] = {
        "monitor": monitor, "on": "validation" if run.validation_fraction > 0 else "test",
        "best_step": best["step"], "last_step": last["step"], "row": row,
        "best_weights": f"{name}.best.weights.h5", "csv": f"eval_{name}.csv",
        "best": selector._metric_part(best), "last": selector._metric_part(last)}


def _write_history(history: Dict[str, List[float]], path: Path) -> None:
    keys = sorted(history)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch"] + keys)
        for i in range(len(history[keys[0]]) if keys else 0):
            writer.writerow([i + 1] + [float(history[k][i]) for k in keys])


def _plot_curves(csv_path: Path, png_path: Path) -> None:
    try:
        from hdml_tf.evaluation.plots import plot_training_curves
    except ImportError:  # pragma: no cover - plots are optional for a run
        return
    plot_training_curves(str(csv_path), str(png_path))


