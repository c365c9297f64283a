"""Resume after interruption: full state round trip, keep-last-k, SIGKILL / SIGTERM, determinism of resumed runs."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import resume_driver
from hdml_tf import experiment
from hdml_tf.callbacks import TrainingInterrupted
from hdml_tf.checkpointing import MANIFEST, CheckpointManager, checkpoint_groups, read_checkpoint

DRIVER = pathlib.Path(__file__).with_name("resume_driver.py")


def _model():
    train = resume_driver.image_set()
    run, hdml, optim = resume_driver.configs("unused")
    return resume_driver.build(train, hdml, optim)


def _randomize(model, seed):
    """Gives every model and optimizer variable (iterations, moments, J_avg, BatchNorm statistics) a new value."""
    rng = np.random.default_rng(seed)
    for variables in checkpoint_groups(model).values():
        for v in variables:
            value = rng.integers(1, 50, v.shape) if "int" in str(v.dtype) else rng.uniform(0.5, 2.0, v.shape)
            v.assign(value.astype(str(v.dtype)))


def _values(model):
    return {g: [np.array(v.numpy()) for v in vs] for g, vs in checkpoint_groups(model).items()}


def test_round_trip_restores_model_three_optimizers_running_means_step_and_schedule(tmp_path):
    saved, fresh = _model(), _model()
    assert set(checkpoint_groups(saved)) == {"model", "optimizer", "generator_optimizer", "classifier_optimizer"}
    _randomize(saved, 0)
    saved.optimizer.iterations.assign(5)  # between the decay steps 3 and 7 of resume_driver's schedule
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.restore(fresh) is None  # empty directory: a fresh start
    assert manager.save(saved, step=123) is not None
    assert manager.restore(fresh) == 123
    expected, got = _values(saved), _values(fresh)
    for group in expected:
        for a, b in zip(expected[group], got[group]):
            np.testing.assert_array_equal(a, b)
    assert float(fresh.j_avg.value.numpy()) == float(saved.j_avg.value.numpy())
    assert float(fresh.j_gen_avg.value.numpy()) == float(saved.j_gen_avg.value.numpy())
    lr = lambda m: float(keras.ops.convert_to_numpy(m.optimizer.learning_rate))  # noqa: E731  the schedule's value
    assert lr(fresh) == lr(saved) == pytest.approx(1e-3 * 0.5)


def test_keeps_the_last_k_and_publishes_the_manifest_last(tmp_path):
    model = _model()
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (2, 4, 6, 8, 10):
        manager.save(model, step)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [MANIFEST, "ckpt-00000006.npz", "ckpt-00000008.npz", "ckpt-00000010.npz"]
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["latest"] == 10 and [c["step"] for c in manifest["checkpoints"]] == [6, 8, 10]
    assert all(len(c["sha256"]) == 64 for c in manifest["checkpoints"])
    # A crash after a file was published but before the manifest was rewritten: the complete file still counts.
    shutil.copy(tmp_path / "ckpt-00000010.npz", tmp_path / "ckpt-00000012.npz")
    assert manager.latest_step == 12


def _driver(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(DRIVER.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(DRIVER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_sigkill_mid_epoch_during_a_save_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """The process dies at step 6 of 10 (mid-epoch: epochs of 4) while writing that step's checkpoint; run again, it
    resumes from step 4 and ends with exactly the weights and optimizer state of an uninterrupted run."""
    ck = tmp_path / "ck"
    killed = _driver(ck, "--kill_in_save", 6)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    names = sorted(p.name for p in (ck / "hdml").iterdir())
    assert names[0].startswith(".ckpt-00000006.npz.tmp-")  # the half-written file of step 6
    assert names[1:] == [MANIFEST, "ckpt-00000002.npz", "ckpt-00000004.npz"]
    first_run_step4 = read_checkpoint(ck / "hdml" / "ckpt-00000004.npz")[1]

    resumed = _driver(ck, "--reference", tmp_path / "ref")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "removed 1 partial checkpoint file(s) left by an interrupted save" in resumed.stderr
    assert "resumed from checkpoint" in resumed.stderr and "(step 4)" in resumed.stderr
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result == {"step": 10, "skipped": 0.0, "reference_step": 10}
    assert not [p for p in (ck / "hdml").iterdir() if ".tmp-" in p.name]

    step, chain = read_checkpoint(ck / "hdml" / "ckpt-00000010.npz")
    _, reference = read_checkpoint(tmp_path / "ref" / "hdml" / "ckpt-00000010.npz")
    assert step == 10 and chain.keys() == reference.keys()
    different = [k for k in chain if not np.array_equal(chain[k], reference[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"
    # Two runs (two processes) agree at step 4 as well.
    _, reference4 = read_checkpoint(tmp_path / "ref" / "hdml" / "ckpt-00000004.npz")
    assert all(np.array_equal(first_run_step4[k], reference4[k]) for k in reference4)
    assert any(not np.array_equal(chain[k], reference4[k]) for k in chain)  # training did move the weights


def test_sigterm_saves_stops_cleanly_and_the_same_call_resumes(tmp_path):
    train = resume_driver.image_set()
    run, hdml, optim = resume_driver.configs(tmp_path, keep=5)
    run = experiment.dataclasses.replace(run, deterministic=False, checkpoint_every=0)
    model = resume_driver.build(train, hdml, optim)
    previous_handler = signal.getsignal(signal.SIGTERM)
    batches = []

    class Preempt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            batches.append(batch)
            if len(batches) == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends on preemption

    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM at step \d of 10; the checkpoint in .* holds "
                                                  r"that step: run the same command again") as stopped:
        experiment.fit(model, run, hdml, train, callbacks=[Preempt()])
    assert stopped.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == previous_handler  # the handler is only installed during fit
    manager = experiment.checkpoint_manager(run, hdml)
    interrupted_at = manager.latest_step
    assert interrupted_at in (3, 4)  # the step the signal arrived in, or the next one
    assert len(batches) == interrupted_at

    batches.clear()
    experiment.fit(model, run, hdml, train)  # the same call again: restores and finishes
    assert manager.latest_step == run.steps
    assert int(model.optimizer.iterations.numpy()) == run.steps  # every step applied once, none repeated
    experiment.fit(model, run, hdml, train)  # a finished run has nothing left to train
    assert manager.latest_step == run.steps


def _kill_at(ck, step, fraction, step_seconds):
    """Starts the driver and SIGKILLs it `fraction` of a step's pause after it finished `step`; returns the first
    step it reported (where it resumed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(DRIVER.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(ck), "--step_seconds", str(step_seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    first = None
    try:
        for line in proc.stdout:
            if line.startswith("STEP "):
                first = first or int(line.split()[1])
                if int(line.split()[1]) >= step:
                    time.sleep(fraction * step_seconds)
                    break
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return first


def test_kills_at_random_moments_then_resume_end_bit_identical(tmp_path):
    """The short version of tools/stress_resume.py (which kills the real backbone's training at many random
    points; README): two SIGKILLs at seeded random moments (inside a step, inside a checkpoint save or an epoch end)
    and a resume after each; the run must end with every weight, BatchNorm statistic, running mean, optimizer
    moment and epoch mean equal to an uninterrupted run's."""
    import random
    rng = random.Random(14)
    ck = tmp_path / "ck"
    first_kill = rng.randint(2, 5)
    assert _kill_at(ck, first_kill, rng.random(), 0.3) == 1
    latest = CheckpointManager(ck / "hdml").latest_step
    second_kill = rng.randint(first_kill + 1, 9)
    resumed_at = _kill_at(ck, second_kill, rng.random(), 0.3)
    assert resumed_at == (latest or 0) + 1  # it resumed from the newest complete checkpoint
    final = _driver(ck, "--reference", tmp_path / "ref")
    assert final.returncode == 0, final.stderr[-3000:]
    assert json.loads(final.stdout.strip().splitlines()[-1])["step"] == 10
    _, chain = read_checkpoint(ck / "hdml" / "ckpt-00000010.npz")
    _, reference = read_checkpoint(tmp_path / "ref" / "hdml" / "ckpt-00000010.npz")
    assert chain.keys() == reference.keys() and any(k.startswith("metrics.") for k in chain)
    different = [k for k in chain if not np.array_equal(chain[k], reference[k])]
    assert not different, f"killed after steps {first_kill} and {second_kill}: {different} differ"


@pytest.mark.skipif(os.environ.get("HDML_LONG_TESTS") != "1", reason="opt-in (HDML_LONG_TESTS=1): about 15 "
                    "minutes on 2 CPU cores; the short version above runs in the suite")
def test_stress_many_random_kills_of_the_real_backbone(tmp_path):
    """tools/stress_resume.py as the README runs it: inception_v1_slim on glyphs, 5 trials x 2 SIGKILLs at random
    moments, every checkpoint of every trial bit-identical to the uninterrupted run."""
    tool = pathlib.Path(__file__).resolve().parents[1] / "tools" / "stress_resume.py"
    result = subprocess.run([sys.executable, str(tool), "--trials=5", "--kills=2", "--references=2",
                             f"--output={tmp_path / 'stress.json'}"], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "stress.json").read_text())
    assert report["all_identical"] and len(report["trials"]) == 5
