"""One training run end to end: data → model → `model.fit` → metrics on the unseen test classes.

`tools/train.py`, `tools/reproduce.py` and the benchmarks parse their flags into a `RunConfig` (plus the method's
`HDMLConfig` and the optimizers' `OptimConfig`) and call the functions here; nothing here reads flags.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import keras
import tensorflow as tf

from hdml_tf.config import ConfigError, HDMLConfig, OptimConfig, RunConfig
from hdml_tf.data.image_set import ImageSet
from hdml_tf.evaluation.metrics import OFFICIAL_KMEANS_RESTARTS, clustering_protocol, format_results
from hdml_tf.rundir import RunDir

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ data
def load_splits(run: RunConfig) -> Tuple[ImageSet, ImageSet]:
    """(train, test) ImageSets of the zero-shot split (test classes unseen in training); a photo set's count check
    against the official numbers is logged (a warning for a partial copy)."""
    from hdml_tf.data import datasets
    splits = datasets.get(run.dataset).load(run.data_dir, image_size=run.augment().resize, seed=run.seed)
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
def evaluation_protocol(run: RunConfig, ks: Sequence[int]):
    """The run's `metrics.EvaluationProtocol`: Recall@K at `ks`, MAP@R, R-Precision, NMI/F1 with the official
    k-means (random_state 1) and `run.kmeans_restarts` restarts."""
    from hdml_tf.evaluation.metrics import EvaluationProtocol
    return EvaluationProtocol(recall_ks=tuple(ks), kmeans_restarts=run.kmeans_restarts)


def evaluate_model(model, dataset: tf.data.Dataset, ks: Sequence[int], progress: bool = False,
                   kmeans_restarts: int = OFFICIAL_KMEANS_RESTARTS) -> Dict[str, float]:
    """NMI, F1 (official k-means protocol with `kmeans_restarts` restarts), Recall@K, MAP@R of a model's
    embeddings of an evaluation dataset."""
    from hdml_tf.evaluation.embedding import embed_dataset
    from hdml_tf.evaluation.metrics import EvaluationProtocol
    embeddings, labels = embed_dataset(model, dataset, progress=progress)
    protocol = EvaluationProtocol(recall_ks=_fitting_ks(ks, labels), kmeans_restarts=kmeans_restarts)
    return protocol.evaluate(embeddings, labels)


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
    from hdml_tf.diagnostics import StepLog
    from hdml_tf.evaluation.callback import EvaluationCallback
    for cb in callbacks:
        if isinstance(cb, EvaluationCallback) and cb.step < initial_step:
            cb.resume_at(initial_step)  # a resumed run counts evaluation steps globally
        if isinstance(cb, StepLog) and initial_step:
            cb.resume_at(initial_step)  # keeps the per-step rows up to the checkpoint
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
    """Seeds Python, NumPy, TensorFlow and Keras, makes TensorFlow ops deterministic and, on a machine without a
    GPU, runs one op at a time (global, irreversible).

    Op determinism alone did not make two CPU runs of the glyph demo equal: measured (README, "Does HDML help?"),
    repeated runs of one seed drifted apart by float round-off after about 20 steps, with or without it, because
    TensorFlow ran independent ops concurrently and the oneDNN kernels inside them then split their sums over a
    varying number of threads. With one inter-op thread, 3 x 100 steps were bit-identical, at no measured cost on
    2 cores. The thread setting only takes effect before TensorFlow's runtime starts; later it is logged, not set.
    """
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    if not tf.config.list_physical_devices("GPU") and tf.config.threading.get_inter_op_parallelism_threads() != 1:
        try:
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            log.warning("--deterministic: TensorFlow's runtime already started, so ops may still run concurrently "
                        "and CPU results may differ by round-off between runs; enable determinism before any "
                        "TensorFlow op (tools do)")


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

    Writes into run.output_dir (`hdml_tf.rundir.RunDir`): results.json, history_<variant>.csv, curves_<variant>.png,
    steps_<variant>.csv / .png and TensorBoard scalars under logs/<variant> (every step's own values),
    <variant>.weights.h5 and <variant>.keras (the last weights; `hdml_tf.rundir.load_keras`, tools/export.py and
    tools/evaluate.py read it).
    With `run.eval_every_epochs` > 0 also eval_<variant>.csv (one row per evaluation), eval_<variant>.json (best
    and last), <variant>.best.weights.h5 (best by `run.monitor`) and TensorBoard scalars under logs/<variant>;
    results["test"] then holds the last checkpoint as "<variant>" and the selected one as
    "<variant> (best val_<monitor> at step N)", and results["selection"][<variant>] says how it was selected.
    Returns the results dict (also in results.json).
    """
    hdml.layout().check_batch_size(run.batch_size)
    from hdml_tf import distribute
    strategy = distribution_strategy(run)  # first: MultiWorkerMirroredStrategy must precede other TF ops
    distribute.check_global_batch(strategy, run.batch_size, hdml.loss)
    run = _per_worker_output(run, strategy)
    if run.deterministic:
        enable_determinism(run.seed)
    out = RunDir(run.output_dir)
    out.path.mkdir(parents=True, exist_ok=True)
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
        from hdml_tf.diagnostics import StepLog
        step_log = StepLog(out.steps(name), log_dir=str(out.logs(name)))
        start = time.time()
        history = fit(model, run, cfg, train, ([selector] if selector else []) + [step_log] + list(callbacks))
        seconds = time.time() - start
        results["test"][name] = evaluate_model(model, test_ds, ks, kmeans_restarts=run.kmeans_restarts)
        results.setdefault("train_seconds", {})[name] = round(seconds, 1)
        out.write_history(name, history.history)
        out.plot_curves(name)
        out.plot_steps(name)
        geometry = run.augment()
        out.save_model(model, name, image_size=geometry.crop, resize=geometry.resize, backbone=run.backbone)
        if selector is not None and selector.best is not None:
            _score_selected(model, run, name, selector, test_ds, ks, results, out)
    results["clustering_protocol"] = clustering_protocol(test.num_classes, n_init=run.kmeans_restarts)
    out.write_results(results)
    rows = dict(results["test"])
    for name in results.get("selection", {}):  # the last checkpoint is named as such
        rows = {(f"{k} (last)" if k == name else k): v for k, v in rows.items()}
    printer(format_results(rows, protocol=results["clustering_protocol"]))
    return results


def _evaluation_callback(run: RunConfig, name: str, image_set: ImageSet, out: RunDir):
    """EvaluationCallback on `image_set` every `run.eval_every_epochs` epochs (None when 0)."""
    if run.eval_every_epochs <= 0:
        return None
    from hdml_tf.evaluation.callback import EvaluationCallback, EvaluationFiles
    ks = _fitting_ks(run.ks(), image_set.labels)
    monitor = run.monitor_key
    if monitor.startswith("recall@") and int(monitor.split("@")[1]) not in ks:
        raise ConfigError(f"monitor={run.monitor!r}: the evaluation split {image_set.name} has only {len(image_set)} "
                          f"images; Recall@K needs K < that")
    files = EvaluationFiles(best_weights=str(out.best_weights(name)), csv=str(out.eval_csv(name)),
                            tensorboard=str(out.logs(name)), summary=str(out.eval_json(name)))
    return EvaluationCallback(eval_dataset(run, image_set), protocol=evaluation_protocol(run, ks), monitor=monitor,
                              every_n_epochs=run.eval_every_epochs, files=files, verbose=int(run.verbose > 0))


def _score_selected(model, run: RunConfig, name: str, selector, test_ds, ks, results: Dict, out: RunDir) -> None:
    """Scores the checkpoint `selector` selected on the test classes (the model keeps the last weights)."""
    best, last = selector.best, selector.last
    monitor = selector.prefix + selector.monitor
    row = f"{name} (best {monitor} at step {best['step']})"
    if best["step"] == last["step"]:
        results["test"][row] = dict(results["test"][name])  # the last checkpoint is the selected one
    else:
        model.load_weights(selector.files.best_weights)
        results["test"][row] = evaluate_model(model, test_ds, ks, kmeans_restarts=run.kmeans_restarts)
        model.load_weights(str(out.weights(name)))
    results.setdefault("selection", {})[name] = {
        "monitor": monitor, "on": "validation" if run.validation_fraction > 0 else "test",
        "best_step": best["step"], "last_step": last["step"], "row": row,
        "best_weights": out.best_weights(name).name, "csv": out.eval_csv(name).name,
        "best": selector.best_metrics, "last": selector.last_metrics}
