"""One training run end to end: data → model → `model.fit` → metrics on the unseen test classes.

`tools/train.py`, `tools/reproduce.py` and the benchmarks parse their flags into a `RunConfig` (plus the method's
`HDMLConfig` and the optimizers' `OptimConfig`) and call the functions here; nothing here reads flags.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from hdml_tf import run_record
from hdml_tf.config import ConfigError, HDMLConfig, OptimConfig, RunConfig
from hdml_tf.data.image_set import ImageSet
from hdml_tf.evaluation.metrics import OFFICIAL_KMEANS_RESTARTS, clustering_protocol, format_results
from hdml_tf.progress import Activity, wrap
from hdml_tf.rundir import RunDir

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ data
def load_splits(run: RunConfig) -> Tuple[ImageSet, ImageSet]:
    """(train, test) ImageSets of the zero-shot split (test classes unseen in training); a photo set's count check
    against the official numbers is logged (a warning for a partial copy)."""
    return _load_splits(run)[:2]


def train_dataset(run: RunConfig, hdml: HDMLConfig, train: ImageSet, start_step: int = 0) -> tf.data.Dataset:
    from hdml_tf.data.pipeline import make_train_dataset
    return make_train_dataset(train, hdml.loss, run.batch_size, run.augment(), seed=run.seed, cache=run.cache,
                              start_step=start_step, strict_images=run.strict_images, verbose=run.verbose)


def eval_dataset(run: RunConfig, image_set: ImageSet) -> tf.data.Dataset:
    from hdml_tf.data.pipeline import make_eval_dataset
    return make_eval_dataset(image_set, run.eval_batch_size, run.augment(), cache=run.cache,
                             strict_images=run.strict_images, verbose=run.verbose)


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
                   kmeans_restarts: int = OFFICIAL_KMEANS_RESTARTS, label: str = "network",
                   what: str = "images") -> Dict[str, float]:
    """NMI, F1 (official k-means protocol with `kmeans_restarts` restarts), Recall@K, MAP@R of a model's
    embeddings of an evaluation dataset. With `progress`, the embedding and the scoring each show a progress line
    starting with `label` ("untrained network: embedding test images: 1,984/4,224 [...]")."""
    from hdml_tf.evaluation.embedding import embed_dataset
    from hdml_tf.evaluation.metrics import EvaluationProtocol
    embeddings, labels = embed_dataset(model, dataset, progress=progress, label=f"{label}: embedding {what}")
    protocol = EvaluationProtocol(recall_ks=_fitting_ks(ks, labels), kmeans_restarts=kmeans_restarts)
    with Activity(scoring_label(label, kmeans_restarts), enabled=progress):
        return protocol.evaluate(embeddings, labels)


def scoring_label(label: str, kmeans_restarts: int = OFFICIAL_KMEANS_RESTARTS, clustering: bool = True) -> str:
    """What the progress line of the metrics says: "hdml: scoring (k-means x10 for NMI/F1, Recall@K, MAP@R)"."""
    kmeans = f"k-means x{kmeans_restarts} for NMI/F1, " if clustering else ""
    return (f"{label}: " if label else "") + f"scoring ({kmeans}Recall@K, MAP@R)"


#: Raw pixels are clustered in this many principal components (k-means in 12,288-d pixel space took ~60 s for the
#: 4,224 glyph test images on 2 cores; the leading components carry the distances k-means works with).
RAW_PIXEL_CLUSTER_DIMS = 256


def evaluate_raw_pixels(dataset: tf.data.Dataset, ks: Sequence[int],
                        kmeans_restarts: int = OFFICIAL_KMEANS_RESTARTS, progress: bool = False,
                        what: str = "images") -> Dict[str, float]:
    """The same metrics with the flattened, centred, L2-normalized pixels as the embedding (what training must beat).

    Recall@K and MAP@R use the full pixel vectors; NMI and F1 cluster their projection on the leading
    RAW_PIXEL_CLUSTER_DIMS principal components (scikit-learn PCA, seeded), which keeps k-means to seconds.
    `progress` shows progress lines for reading the images and for scoring.
    """
    from sklearn.decomposition import PCA

    from hdml_tf.evaluation.embedding import embed_dataset
    from hdml_tf.evaluation.metrics import evaluate, nmi_f1

    def pixels(images):
        flat = tf.reshape(tf.cast(images, tf.float32), [tf.shape(images)[0], -1])
        return tf.math.l2_normalize(flat - tf.reduce_mean(flat, axis=1, keepdims=True), axis=1)

    embeddings, labels = embed_dataset(pixels, dataset, progress=progress, label=f"raw pixels: reading {what}")
    with Activity(scoring_label("raw pixels", kmeans_restarts), enabled=progress):
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
    optimizers, J_avg / J_gen, step counter, the epoch's running means) and training goes on from its step: the
    sampler continues at that batch (`start_step`), the learning-rate schedule at the restored
    `optimizer.iterations`, and Keras' epoch counter at the epoch of that step (`initial_epoch`), so epochs are
    numbered as in an uninterrupted run. Every callback with a `resume_at(step)` method (EvaluationCallback,
    EpochLog) is told the step first. Checkpoints are written every `run.checkpoint_every` steps, at the end, and on
    SIGTERM or SIGINT (Ctrl-C); without a checkpoint directory those signals still stop training cleanly.

    Raises:
      TrainingInterrupted: SIGTERM / SIGINT stopped training (after saving a checkpoint, when there is a
        checkpoint directory); run again to resume.
      TrainingDiverged: `run.max_bad_steps` consecutive steps had NaN/Inf losses or gradients.
      CheckpointError: checkpoint_dir holds checkpoints, none readable or of another model.
      ConfigError: the model's classifier has fewer outputs than the training split has classes.
    """
    from hdml_tf.callbacks import ContinueEpochMeans, SaveOnSignal, TrainingInterrupted
    check_num_classes(model, train)
    if run.deterministic:
        tf.config.experimental.enable_op_determinism()
        _warn_if_onednn()
    manager = checkpoint_manager(run, hdml)
    if manager is not None:
        restored = manager.restore(model)
        initial_step = initial_step if restored is None else restored
    for cb in callbacks:
        if callable(getattr(cb, "resume_at", None)):
            cb.resume_at(initial_step)  # a resumed run counts steps (and continues its files) globally
    if initial_step >= run.steps:
        log.info("training already reached step %d of %d (checkpoint in %s); nothing left to train", initial_step,
                 run.steps, manager.directory if manager else "-")
        return keras.callbacks.History()
    safety = fault_tolerance_callbacks(run, manager, initial_step)
    if manager is not None and manager.restored_metrics is not None and initial_step % run.steps_per_epoch:
        safety.append(ContinueEpochMeans(manager.restored_metrics))  # resumed mid-epoch
    try:
        history = _fit_global_epochs(model, run, hdml, train, safety + list(callbacks), initial_step)
    finally:
        for cb in safety:
            if isinstance(cb, SaveOnSignal):
                cb.restore_handlers()
    for cb in safety:
        if isinstance(cb, SaveOnSignal) and cb.interrupted is not None:
            raise TrainingInterrupted(cb.message, cb.interrupted)
    return history


class _OneTraining(keras.callbacks.CallbackList):
    """The callbacks of two `model.fit` calls that make one training: the train begin of the first and the train
    end of the last reach the callbacks, nothing in between (see `_fit_global_epochs`)."""

    begun = ended = False
    last = True

    def on_train_begin(self, logs=None):
        if not self.begun:
            self.begun = True
            super().on_train_begin(logs)

    def on_train_end(self, logs=None):
        if self.last and not self.ended:
            self.ended = True
            super().on_train_end(logs)


def _fit_global_epochs(model, run: RunConfig, hdml: HDMLConfig, train: ImageSet, callbacks,
                       initial_step: int) -> keras.callbacks.History:
    """`model.fit` from global step `initial_step` to `run.steps` with epochs on the global grid.

    Keras counts an epoch's steps from where `fit` starts, so a run resumed mid-epoch would shift every later epoch
    end (history rows, evaluations every k epochs) against an uninterrupted run. A mid-epoch resume therefore first
    finishes its epoch in a `fit` of the remaining steps, then trains whole epochs in a second `fit`; the callbacks
    see one training (`_OneTraining`), and each `fit` reads the sampler from its own first step.
    """
    spe = min(run.steps_per_epoch, run.steps)
    epochs = -(-run.steps // spe)
    first, into = divmod(initial_step, spe)
    phases = ([(first, first + 1, spe - into, initial_step)] if into else []) + [
        (first + (1 if into else 0), epochs, spe, (first + (1 if into else 0)) * spe)]
    phases = [p for p in phases if p[0] < p[1]]
    from hdml_tf.training_progress import TrainingProgress
    # Our own progress line (a few quantities, the whole run's time left), first so that its epoch line comes
    # before what the evaluation callback prints; Keras' bar would print all logged quantities.
    shown = [TrainingProgress(run.steps, initial_step, spe, "hdml" if hdml.hdml else "baseline")
             ] if run.verbose else []
    listed = _OneTraining(shown + list(callbacks), add_history=True, add_progbar=False, verbose=0,
                          epochs=epochs, steps=spe, model=model)
    for i, (start_epoch, end_epoch, steps, start_step) in enumerate(phases):
        listed.last = i == len(phases) - 1
        listed.set_params({"verbose": 0, "epochs": epochs, "steps": steps})
        ds = distributed_train_dataset(model, run, hdml, train, start_step=start_step)
        # shuffle=False: the sampler orders the batches (a tf.data dataset is never shuffled by fit anyway).
        model.fit(ds, epochs=end_epoch, steps_per_epoch=steps, initial_epoch=start_epoch, callbacks=listed,
                  verbose=0, shuffle=False)
        if model.stop_training:
            break
    if not listed.ended:  # stopped in an earlier phase: end the training for the callbacks
        listed.last = True
        listed.on_train_end()
    return model.history


def enable_determinism(seed: int) -> None:
    """Seeds Python, NumPy, TensorFlow and Keras, makes TensorFlow ops deterministic and, on a machine without a
    GPU, runs one op at a time (global, irreversible).

    Op determinism alone did not make two CPU runs of the glyph demo equal, for two measured reasons. (1) Repeated
    runs of one seed drifted apart by float round-off after about 20 steps because TensorFlow ran independent ops
    concurrently and the oneDNN kernels inside them then split their sums over a varying number of threads; with
    one inter-op thread, 3 x 100 steps were bit-identical, at no measured cost on 2 cores (README, "Does HDML
    help?"). The thread setting only takes effect before TensorFlow's runtime starts; later it is logged, not set.
    (2) Even so, two processes could differ in the last bit of a gradient with oneDNN on (README "Runs, resuming,
    and what is never lost"): TF_ENABLE_ONEDNN_OPTS=0 before TensorFlow is imported (the tools do it for
    --deterministic); `run_record.onednn_enabled` tells, and a warning says so.
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
    _warn_if_onednn()


_ONEDNN_WARNED = []


def _warn_if_onednn() -> None:
    from hdml_tf.run_record import onednn_enabled
    if onednn_enabled() and not tf.config.list_physical_devices("GPU") and not _ONEDNN_WARNED:
        _ONEDNN_WARNED.append(True)
        log.warning("deterministic run with TensorFlow's oneDNN CPU kernels on: two processes can differ in the last "
                    "bits of a gradient (measured: README 'Runs, resuming, and what is never lost'); set "
                    "TF_ENABLE_ONEDNN_OPTS=0 before TensorFlow is imported (tools/train.py does it for "
                    "--deterministic)")


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
    """Step limit, NaN guard, periodic checkpoints (with a checkpoint manager) and a clean stop on SIGTERM / SIGINT
    (which saves a checkpoint when there is a manager), in this order: the guard raises before a checkpoint of a
    diverged step could be written."""
    from hdml_tf.callbacks import NonFiniteGuard, PeriodicCheckpoint, SaveOnSignal, StopAtStep
    found = [StopAtStep(run.steps, initial_step), NonFiniteGuard(run.max_bad_steps, initial_step, manager)]
    checkpoint = None
    if manager is not None:
        checkpoint = PeriodicCheckpoint(manager, run.checkpoint_every, initial_step)
        found.append(checkpoint)
    found.append(SaveOnSignal(checkpoint, initial_step=initial_step, total_steps=run.steps))
    return found


# ------------------------------------------------------------------------------------------------ the run
def variants_of(hdml: HDMLConfig, compare_baseline: bool = False) -> List[Tuple[str, HDMLConfig]]:
    """[(name, HDMLConfig)] a run trains: "hdml" or "baseline", plus "baseline" with `compare_baseline`."""
    found = [("hdml" if hdml.hdml else "baseline", hdml)]
    if compare_baseline and hdml.hdml:
        found.append(("baseline", dataclasses.replace(hdml, hdml=False)))
    return found


def resolve_output_dir(run: RunConfig, hdml: HDMLConfig, optim: OptimConfig, compare_baseline: bool = False,
                       strategy=None) -> RunConfig:
    """`run` with its output directory decided (`run.output_dir` when given).

    Without one: the directory the run's checkpoint directory records for this same run (so the same command
    continues its run), else runs/<run_name>, else a new runs/<dataset>_<loss>_<method>/version_<N>.
    """
    from hdml_tf import distribute, rundir
    if run.output_dir:
        return run
    if strategy is not None and distribute.num_workers(strategy) > 1:
        raise ConfigError("--strategy=multi_worker needs an explicit --output_dir (every worker must name the same "
                          "directory)")
    names = [name for name, _ in variants_of(hdml, compare_baseline)]
    identity = rundir.run_identity(dataclasses.asdict(run), dataclasses.asdict(hdml), dataclasses.asdict(optim),
                                   names)
    found = rundir.recorded_output_dir(run.checkpoint_dir, identity)
    if found is None:
        found = rundir.default_output_dir(run.dataset, hdml.loss, names, run.run_name)
    return dataclasses.replace(run, output_dir=str(found))


def run_experiment(run: RunConfig, hdml: HDMLConfig, optim: OptimConfig, *, compare_baseline: bool = False,
                   callbacks: Sequence = (), printer=print) -> Dict:
    """Trains HDML (and the plain baseline when asked) and scores raw pixels, the untrained and the trained network.

    The run owns its output directory (`hdml_tf.rundir.claim_run`, README "Runs, resuming, and what is never
    lost"): before any work the directory (and the checkpoint directory) is created, test-written and locked; a
    directory of another run is refused unless `run.overwrite`; the same run continues where it stopped (finished
    evaluations and variants are not redone; training resumes from its checkpoints); a complete run is reported
    from its stored results and no file is changed. Without `run.output_dir` a new directory per run is used
    (`resolve_output_dir`).

    Writes into the output directory (`hdml_tf.rundir.RunDir`): run.json, results.json, history_<variant>.csv (one
    row per epoch, as it goes), curves_<variant>.png, <variant>.weights.h5 and <variant>.keras (the last weights;
    `hdml_tf.rundir.load_keras`, tools/export.py and tools/evaluate.py read it), TensorBoard scalars of every
    training loss and diagnostic under logs/<variant>/train,
    steps_<variant>.csv / .png (every step's own values, `hdml_tf.diagnostics.StepLog`).
    With `run.eval_every_epochs` > 0 also eval_<variant>.csv (one row per evaluation), eval_<variant>.json (best
    and last), <variant>.best.weights.h5 (best by `run.monitor`) and the val_* TensorBoard scalars under
    logs/<variant>; results["test"] then holds the last checkpoint as "<variant>" and the selected one as
    "<variant> (best val_<monitor> at step N)", and results["selection"][<variant>] says how it was selected.
    Returns the results dict (also in results.json; results["output_dir"] is the directory).

    Raises:
      HDMLError: bad input or an unusable directory (before any work), a failed write (one line; what was saved
        is named), TrainingInterrupted on SIGTERM / SIGINT.
    """
    from hdml_tf import atomic, distribute, rundir
    hdml.layout().check_batch_size(run.batch_size)
    strategy = distribution_strategy(run)  # first: MultiWorkerMirroredStrategy must precede other TF ops
    distribute.check_global_batch(strategy, run.batch_size, hdml.loss)
    variants = variants_of(hdml, compare_baseline)
    run = resolve_output_dir(run, hdml, optim, compare_baseline, strategy)
    run = _per_worker_output(run, strategy)
    identity = rundir.run_identity(dataclasses.asdict(run), dataclasses.asdict(hdml), dataclasses.asdict(optim),
                                   [name for name, _ in variants])
    with rundir.claim_run(run.output_dir, identity, checkpoint_dir=run.checkpoint_dir,
                          overwrite=run.overwrite) as claim:
        if claim.state == "complete":
            return _report_complete(claim, printer)
        if run.cache and run.cache != "memory":
            atomic.check_writable_dir(run.cache, "--cache")
        if claim.state == "restart":
            log.warning("%s holds an interrupted start of this run without checkpoints: training starts again from "
                        "step 0 (pass --checkpoint_dir to be able to resume)", claim.out.path)
        results = _train_and_score(run, hdml, optim, variants, claim, callbacks, printer)
        claim.complete()
    return results


def _report_complete(claim, printer) -> Dict:
    """A complete run asked again: says so and prints its stored results; changes no file."""
    out = claim.out
    results = out.read_results()
    ended = claim.marker.get("ended") or "?"
    printer(f"run complete: {out.path} holds this run, finished {ended}; nothing was changed. Its results "
            f"({out.results.name}):")
    if results.get("test"):
        printer(format_results(_table_rows(results), protocol=results.get("clustering_protocol")))
    printer(f"(to train it again pass --overwrite; to score it again: tools/evaluate.py --model={out.path} "
            f"--output_json=NEW.json)")
    return results


def _table_rows(results: Dict) -> Dict:
    rows = dict(results["test"])
    for name in results.get("selection", {}):  # the last checkpoint is named as such
        rows = {(f"{k} (last)" if k == name else k): v for k, v in rows.items()}
    return rows


def _train_and_score(run: RunConfig, hdml: HDMLConfig, optim: OptimConfig, variants, claim, callbacks,
                     printer) -> Dict:
    from hdml_tf import distribute
    from hdml_tf.callbacks import EpochLog
    out = claim.out
    started = time.time()
    strategy = distribution_strategy(run)
    if run.deterministic:
        enable_determinism(run.seed)
    train, test, count_report = _load_splits(run)
    printer(f"data: {run.dataset}: {len(train):,} training images ({train.num_classes:,} classes), "
            f"{len(test):,} test images ({test.num_classes:,} unseen classes); crop {run.crop_size()} px")
    val = None
    if run.validation_fraction > 0:
        from hdml_tf.evaluation.callback import split_validation_classes
        try:
            train, val = split_validation_classes(train, run.validation_fraction, seed=run.seed)
        except ValueError as e:
            raise ConfigError(f"validation_fraction={run.validation_fraction}: {e}")
        printer(f"model selection on {len(val):,} validation images of {val.num_classes} training classes held "
                f"out (training on the other {train.num_classes})")
    check_splits(run, hdml, train, test, val)
    if run.strategy != "default":  # one device: the tools' device line said which (tools/common_flags.py)
        printer(distribute.describe(strategy, run.batch_size, hdml.loss) + f"; {run.mixed_precision} compute")
    test_ds = eval_dataset(run, test)
    ks = run.ks()
    shown = run.verbose > 0
    done = claim.variant_results
    results = {"run": dataclasses.asdict(run), "method": dataclasses.asdict(hdml),
               "optim": dataclasses.asdict(optim), "output_dir": str(out.path), "test": {}}
    results["record"] = run_record.run_record(run, train, test, val, count_report, claim.marker.get("starts", []))
    if "raw_pixels" not in done:
        done["raw_pixels"] = {"test": {"raw_pixels": evaluate_raw_pixels(test_ds, ks, run.kmeans_restarts,
                                                                         progress=shown, what="test images")}}
        claim.finished("raw_pixels", done["raw_pixels"])
    _merge(results, done["raw_pixels"])
    for name, cfg in variants:
        if name in done:  # trained, scored and saved by an earlier start
            printer(f"{name}: trained and scored by an earlier start of this run (kept)")
            _merge(results, done[name])
            continue
        model = build_model(run, cfg, optim, train.num_classes)
        check_disk_space(model, run, out)
        if "untrained" not in done:
            done["untrained"] = {"test": {"untrained": evaluate_model(
                model, test_ds, ks, kmeans_restarts=run.kmeans_restarts, progress=shown, label="untrained network",
                what="test images")}}
            claim.finished("untrained", done["untrained"])
        _merge(results, done["untrained"])
        printer(f"training {name}: {cfg.loss} loss, {run.backbone} at {run.crop_size()} px, batch {run.batch_size}, "
                f"{run.steps:,} steps")
        selector = _evaluation_callback(run, name, val if val is not None else test, out)
        from hdml_tf.diagnostics import StepLog
        epoch_log = EpochLog(out.history(name), out.train_logs(name), run.steps_per_epoch)
        step_log = StepLog(out.steps(name), log_dir=str(out.logs(name)))
        start = time.time()
        fit(model, run, cfg, train, ([selector] if selector else []) + [epoch_log, step_log] + list(callbacks))
        seconds = time.time() - start
        geometry = run.augment()
        out.save_model(model, name, image_size=geometry.crop, resize=geometry.resize, backbone=run.backbone)
        piece = {"test": {name: evaluate_model(model, test_ds, ks, kmeans_restarts=run.kmeans_restarts,
                                               progress=shown, label=f"trained {name}", what="test images")},
                 "training": {name: {"steps": run.steps, "final_step": int(model.optimizer.iterations.numpy()),
                                     "skipped_steps": int(float(keras.ops.convert_to_numpy(model.skipped))),
                                     "seconds_this_start": round(seconds, 1),
                                     "starts": len(claim.marker.get("starts", []))}},
                 "train_seconds": {name: round(seconds, 1)}}
        out.plot_curves(name)
        out.plot_steps(name)
        if selector is not None and selector.best is not None:
            _score_selected(model, run, name, selector, test_ds, ks, piece, out)
        claim.finished(name, piece)
        _merge(results, piece)
    results["clustering_protocol"] = clustering_protocol(test.num_classes, n_init=run.kmeans_restarts)
    run_record.record_skipped_images(results["record"], {"train": train, "test": test, "validation": val})
    results["record"]["wall_seconds_this_start"] = round(time.time() - started, 1)
    results["record"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out.write_results(results)
    printer(wrap(format_results(_table_rows(results), protocol=results["clustering_protocol"])))
    from hdml_tf.run_summary import summary_lines
    for line in summary_lines(out, [name for name, _ in variants]):
        printer(line)
    return results


def check_splits(run: RunConfig, hdml: HDMLConfig, train: ImageSet, test: ImageSet, val=None) -> None:
    """Before any work: the training split can fill a batch of the loss's layout, and the test (and validation)
    split can be scored (a class with two or more images for Recall@K, two classes for the zero-shot protocol).

    Raises:
      DataError: one line naming the split, what it has and what it needs.
    """
    from hdml_tf.data.sampler import TupleSampler
    from hdml_tf.errors import DataError
    TupleSampler(train.labels, hdml.loss, run.batch_size, run.seed, name=train.name or f"{run.dataset}/train")
    for image_set, role in ((test, "test"), (val, "validation")):
        if image_set is None:
            continue
        counts = np.bincount(np.asarray(image_set.labels, np.int64)) if len(image_set) else np.zeros(0, int)
        name = image_set.name or f"{run.dataset}/{role}"
        if (counts > 0).sum() < 2:
            raise DataError(f"{name}: the {role} split has {(counts > 0).sum()} class(es); scoring unseen classes "
                            "needs at least 2 (a folder data set: add class folders)")
        if not (counts >= 2).any():
            raise DataError(f"{name}: every class of the {role} split has a single image, so no image has a "
                            "neighbour of its class and Recall@K is undefined; each class needs at least 2 images")


def _merge(results: Dict, piece: Dict) -> None:
    """Adds a finished piece ({"test": {...}, "selection": {...}, ...}) into the results, section by section."""
    for section, values in piece.items():
        if isinstance(values, dict):
            results.setdefault(section, {}).update(values)
        else:
            results[section] = values


def _load_splits(run: RunConfig):
    """(train, test, the photo set's count report or None)."""
    from hdml_tf.data import datasets
    splits = datasets.get(run.dataset).load(run.data_dir, image_size=run.augment().resize, seed=run.seed)
    # The photo set's reader has already logged its count check (once per run: a warning for a partial copy).
    return splits[0], splits[1], getattr(splits, "report", None)


def check_disk_space(model, run: RunConfig, out: RunDir) -> None:
    """Refuses to start when the disks of the output and checkpoint directories cannot hold what the run writes
    (weights, .keras with the optimizers, the best weights, `keep_checkpoints` + 1 checkpoints), so a full disk is
    found in seconds, not after hours of training. One WriteError line names the space needed and free."""
    from hdml_tf import atomic, rundir
    weights = sum(_nbytes(v) for v in model.variables)
    optimizer = sum(_nbytes(v) for opt in _optimizers(model) for v in opt.variables)
    needs = {out.path: weights * (2 + (1 if run.eval_every_epochs > 0 else 0)) + optimizer}
    if run.checkpoint_dir:
        ckpt = Path(run.checkpoint_dir)
        needs[ckpt] = needs.get(ckpt, 0) + (run.keep_checkpoints + 1) * (weights + optimizer)
    by_device: Dict[int, List] = {}
    for path, size in needs.items():
        by_device.setdefault(os.stat(path).st_dev, []).append((path, size))
    for entries in by_device.values():
        needed = sum(size for _, size in entries)
        free = rundir.free_bytes(entries[0][0])
        if free is not None and free < needed * 1.05 + (1 << 20):
            where = " and ".join(str(p) for p, _ in entries)
            raise atomic.WriteError(
                f"not enough disk space for this run: {where} has {free / 1e6:,.1f} MB free, but the run writes about "
                f"{needed / 1e6:,.1f} MB (weights {weights / 1e6:,.1f} MB, optimizers {optimizer / 1e6:,.1f} MB"
                + (f", {run.keep_checkpoints} checkpoints kept" if run.checkpoint_dir else "")
                + "); free some space or choose another directory")


def _nbytes(variable) -> int:
    return int(np.prod(variable.shape)) * tf.as_dtype(variable.dtype).size


def _optimizers(model):
    return [o for o in (getattr(model, a, None) for a in ("optimizer", "generator_optimizer",
                                                            "classifier_optimizer")) if o is not None]


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
                              every_n_epochs=run.eval_every_epochs, files=files, verbose=int(run.verbose > 0),
                              progress=run.verbose > 0)


def _score_selected(model, run: RunConfig, name: str, selector, test_ds, ks, results: Dict, out: RunDir) -> None:
    """Scores the checkpoint `selector` selected on the test classes (the model keeps the last weights)."""
    best, last = selector.best, selector.last
    monitor = selector.prefix + selector.monitor
    row = f"{name} (best {monitor} at step {best['step']})"
    if best["step"] == last["step"]:
        results["test"][row] = dict(results["test"][name])  # the last checkpoint is the selected one
    else:
        model.load_weights(selector.files.best_weights)
        results["test"][row] = evaluate_model(model, test_ds, ks, kmeans_restarts=run.kmeans_restarts,
                                              progress=run.verbose > 0, label=f"selected {name} (step {best['step']})",
                                              what="test images")
        model.load_weights(str(out.weights(name)))
    results.setdefault("selection", {})[name] = {
        "monitor": monitor, "on": "validation" if run.validation_fraction > 0 else "test",
        "best_step": best["step"], "last_step": last["step"], "row": row,
        "best_weights": out.best_weights(name).name, "csv": out.eval_csv(name).name,
        "best": selector.best_metrics, "last": selector.last_metrics}
