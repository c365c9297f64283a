"""tools/gpu_check.py on the CPU at tiny sizes, and the hdml_tf.benchmarking pieces it is made of.

One tiny run (module fixture) covers device facts, step timing, the input pipeline and the float16 / float32
training runs; every number in its JSON is checked against the numbers it was computed from. Separate short runs
check the budget stop, SIGTERM and bad flags. No GPU here: the run must say that its numbers are CPU numbers.
"""
import json
import math
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import cub_subset_dir, load_tool

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "gpu_check.py"
TINY = ["--image_size=64", "--batch_size=8", "--num_classes=8", "--timing_steps=1", "--timing_rounds=2",
        "--timing_warmup=1", "--precisions=float32", "--pipeline_steps=3", "--pipeline_warmup=1",
        "--eval_batch_size=32", "--scale_every=2", "--dataset=generated"]
TRAIN_STEPS = 4


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1", MPLBACKEND="Agg",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def _run(args, timeout=600):
    return subprocess.run([sys.executable, str(TOOL)] + [str(a) for a in args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    proc = _ok(_run(TINY + [f"--train_steps={TRAIN_STEPS}", "--pieces=device,step_float32,pipeline,train",
                            "--budget_s=500", f"--output={out}"]))
    return proc, json.loads(out.read_text()), out


# ------------------------------------------------------------------------------------------------ the tiny run
def test_cpu_run_says_its_numbers_are_cpu_numbers(tiny):
    proc, result, out = tiny
    assert result["numbers_are"] == "CPU" and "CPU numbers" in result["note"]
    assert "CPU NUMBERS" in proc.stdout and "(all numbers above are CPU numbers)" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith(f"JSON: {out} (status complete")
    assert result["status"] == "complete"
    assert {k: p["status"] for k, p in result["pieces"].items()} == dict.fromkeys(
        ("device", "step_float32", "pipeline", "train"), "done")
    facts = result["pieces"]["device"]["facts"]
    assert facts["accelerator"] == "CPU" and facts["gpus"] == [] and facts["cpu_cores"] >= 1
    assert facts["tensorflow"].startswith("2.")
    # The probes compare a 16-bit conv + matmul with float32: float16 keeps ~3 decimal digits, bfloat16 ~2.
    assert facts["xla"]["usable"] is True and facts["xla"]["relative_error_vs_float32"] < 1e-4
    for precision, error in (("float16", 1e-2), ("bfloat16", 5e-2)):
        probe = facts["precisions"][precision]
        assert probe["usable"] and probe["relative_error_vs_float32"] < error and probe["tensor_cores"] is None
    assert result["xla_note"].startswith("XLA not timed on the CPU")


def test_step_timing_numbers_follow_from_the_recorded_blocks(tiny):
    _, result, _ = tiny
    piece = result["pieces"]["step_float32"]
    assert piece["layout"] == "4 anchors x 4 synthetic negatives each (16 synthetic rows)"
    assert set(piece["variants"]) == {"baseline_float32", "hdml_float32"}
    assert piece["rounds_done"] == 2
    for name, v in piece["variants"].items():
        assert "error" not in v, v
        assert (v["method"], v["precision"], v["jit_compile"], v["batch_size"]) == (
            name.split("_")[0], "float32", False, 8)
        assert len(v["block_step_seconds"]) == 2
        assert v["step_seconds"] == pytest.approx(statistics.median(v["block_step_seconds"]), abs=1e-4)
        assert v["images_per_s"] == pytest.approx(8 / v["step_seconds"], rel=2e-3)
        assert v["warmup_and_compile_seconds"] >= v["first_step_seconds"] > 0
        assert v["memory"]["max_rss_after_warmup_bytes"] > 0
        assert result["derived"]["projected_row"]["per_variant_minutes"][name] == pytest.approx(
            8000 * v["step_seconds"] / 60, abs=0.06)
    h, b = (piece["variants"][k]["block_step_seconds"] for k in ("hdml_float32", "baseline_float32"))
    ratio = piece["hdml_over_baseline"]["no_xla"]
    assert ratio["wall"] == pytest.approx(statistics.median(x / y for x, y in zip(h, b)), rel=2e-3, abs=2e-3)
    assert ratio["target"] == 1.10 and ratio["meets_target"] == (ratio["wall"] <= 1.10)
    assert piece["xla"] == {}  # XLA is not timed on a CPU by default
    fastest = result["derived"]["projected_row"]["fastest_hdml"]
    assert fastest["variant"] == "hdml_float32"
    assert fastest["minutes"] == pytest.approx(8000 * piece["variants"]["hdml_float32"]["step_seconds"] / 60, abs=0.06)


def test_pipeline_rates_and_their_ratio_to_the_step(tiny):
    _, result, _ = tiny
    piece = result["pieces"]["pipeline"]
    data = piece["data"]
    # --dataset=generated at batch 8: 8 classes x 8 JPEGs, half of the classes train (N-pair needs B/2 = 4).
    assert (data["dataset"], data["train_classes"], data["train_images"], data["test_classes"]) == (
        "generated JPEGs", 4, 32, 4)
    assert data["batch_size"] == 8 and data["crop"] == 64 and data["resize"] == 256
    assert not pathlib.Path(data["data_dir"]).exists()  # the temporary scratch folder is removed at the end
    assert set(piece["modes"]) == {"uncached", "memory", "disk"}
    for mode, t in piece["modes"].items():
        assert t["steps"] == 3 and t["seconds"] == pytest.approx(3 * 8 / t["images_per_s"], abs=6e-4), mode
    io = result["derived"]["input_vs_step"]
    consumes = result["pieces"]["step_float32"]["variants"]["hdml_float32"]["images_per_s"]
    assert io["consumer"] == "hdml_float32" and io["consumer_images_per_s"] == consumes
    cached = max(piece["modes"]["memory"]["images_per_s"], piece["modes"]["disk"]["images_per_s"])
    assert io["cached_ratio"] == pytest.approx(cached / consumes, rel=0.01)
    assert io["uncached_ratio"] == pytest.approx(piece["modes"]["uncached"]["images_per_s"] / consumes, rel=0.01)


def test_float16_run_records_three_loss_scales_and_its_overflows(tiny):
    _, result, _ = tiny
    runs = result["pieces"]["train"]["runs"]
    f16, f32 = runs["float16"], runs["float32"]
    for r in (f16, f32):
        assert r["steps_done"] == TRAIN_STEPS and r["batch_size"] == 8 and r["seed"] == 0
        assert r["skipped_steps"] == 0 and r["final_losses_finite"]
        assert 0.0 <= r["metrics"]["nmi"] <= 1.0 and 0.0 <= r["metrics"]["recall@1"] <= 1.0
        assert r["images_per_s"] == pytest.approx(8 / r["step_seconds_median"], rel=0.01)
    scale = f16["loss_scale"]
    assert scale["optimizers"] == ["metric", "generator", "classifier"] and scale["every"] == 2
    trajectory = np.array(scale["trajectory"])
    assert trajectory[:, 0].tolist() == [0, 2, 4]
    assert trajectory[0, 1:].tolist() == [2.0 ** 15] * 3  # keras' initial dynamic scale
    exponents = np.log2(trajectory[:, 1:])
    assert np.all(exponents == np.round(exponents)) and np.all(np.diff(trajectory[:, 1:], axis=0) <= 0)
    # On one device the loss-scale optimizer halves its scale exactly on the steps whose scaled gradient was not
    # finite, which the model flags in `nonfinite` (read by the recorder every step).
    halvings = scale["decreases"].get("metric", 0)
    assert halvings == f16["nonfinite_by_quantity"].get("grad(J_metric)", 0)
    assert scale["final"]["metric"] == 2.0 ** 15 / 2 ** halvings == trajectory[-1, 1]
    assert f32["loss_scale"] is None and f32["nonfinite_steps"] == 0  # float32 has no loss scale, no overflow
    agree = result["derived"]["float16_vs_float32"]
    for key in ("nmi", "recall@1"):
        assert agree["difference_points"][key] == pytest.approx(
            100 * (f16["metrics"][key] - f32["metrics"][key]), abs=0.011)
    assert agree["same_steps"] and agree["within_spread"] is None and "spread" in agree["why_no_verdict"]
    minutes = result["derived"]["projected_row"]["from_training_runs_minutes"]
    assert minutes["float16"] == pytest.approx(8000 * f16["step_seconds_median"] / 60, abs=0.06)


# ------------------------------------------------------------------------------------------------ stops, flags
def test_budget_stop_leaves_a_valid_json_with_the_rest_skipped(tmp_path):
    out = tmp_path / "check.json"
    budget = 12
    start = time.monotonic()
    proc = _ok(_run(TINY + ["--train_steps=50", "--pieces=device,step_float32,train", f"--budget_s={budget}",
                            f"--output={out}"]))
    wall = time.monotonic() - start
    result = json.loads(out.read_text())
    assert result["status"] == "budget_reached"
    # The watchdog starts once TensorFlow is imported (startup_s); on a loaded machine that alone may take longer.
    assert result["elapsed_s"] <= max(budget, result["startup_s"]) + 2
    assert wall < max(budget, result["startup_s"]) + 15  # + the interpreter's start and exit
    statuses = {k: p["status"] for k, p in result["pieces"].items()}
    assert set(statuses.values()) <= {"done", "interrupted", "skipped"}
    assert statuses["train"] == "skipped" and "budget" in result["pieces"]["train"]["reason"]
    assert f"JSON: {out} (status budget_reached" in proc.stdout


def test_sigterm_marks_the_running_piece_interrupted(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.Popen([sys.executable, str(TOOL)] + TINY + [
        "--pieces=device,step_float32,train", "--budget_s=300", f"--output={out}"], cwd=REPO, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until the first model is being built
            time.sleep(0.5)
            try:
                if json.loads(out.read_text())["pieces"]["step_float32"]["status"] == "running":
                    break
            except (OSError, ValueError, KeyError):
                pass  # not written yet (never half-written: see test_write_json_atomic_...)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["status"] == "interrupted"
    assert result["pieces"]["device"]["status"] == "done"
    assert result["pieces"]["step_float32"]["status"] == "interrupted"
    assert result["pieces"]["train"] == {"status": "skipped", "reason": "interrupted by SIGTERM"}


@pytest.mark.parametrize("flag, message", [
    ("--precisions=float8", "error: --precisions=float8: expected a list of float32, float16, bfloat16"),
    ("--batch_size=9", "error: batch_size=9 does not fit the npair layout"),
    ("--no_such_flag=1", "error: Unknown command line flag 'no_such_flag'"),
])
def test_a_bad_flag_is_one_error_line(flag, message):
    proc = _run([flag], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_an_unwritable_output_is_one_error_line_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = _run([f"--output={blocker / 'check.json'}"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --output={blocker / 'check.json'} cannot be written ({blocker} is not a writable directory); "
        f"expected a path in a writable directory")


def _settings(*argv):
    """The tool's Settings from command-line flags, parsed into a private FlagValues (no global flags touched)."""
    from absl import flags
    tool = load_tool("gpu_check")
    values = flags.FlagValues()
    tool.define_flags(values)
    values(["gpu_check.py", *argv])
    return tool, tool.settings_from_flags(values)


def test_default_settings_are_the_papers():
    """Without flags the check runs the paper's CUB-200 N-pair row: Caffe GoogLeNet, 227 px, batch 128 (and 120
    for the triplet layout), the flagfile's hyper-parameters, an 8-minute budget."""
    tool, settings = _settings()
    found = json.loads(json.dumps(settings.to_json()))  # as it lands in the JSON
    assert (found["backbone"], found["image_size"], found["resize"], found["batch_size"],
            found["triplet_batch_size"]) == ("inception_v1_caffe", 227, 256, 128, 120)
    assert found["budget_s"] == 480 and found["xla"] == "auto" and found["train_steps"] == 300
    assert found["row_steps"] == 8000  # the flagfile's --steps: what the projection is for
    assert found["precisions"] == ["float32", "float16", "bfloat16"] and found["methods"] == ["baseline", "hdml"]
    assert tool.selected_pieces(settings) == ["device", "step_float32", "pipeline", "train", "step_float16",
                                              "step_bfloat16", "step_triplet", "train_spread"]
    # configs/cub200_npair.cfg (test_reproduce checks those values against the official code)
    assert found["hdml"]["embedding_size"] == 256 and found["hdml"]["beta"] == 5e3
    assert found["hdml"]["npair_l2"] == 1.5e-2 and found["hdml"]["weight_decay"] == 1e-3
    # CUB trains at a constant rate (configs/README.md: the official halving never fires with CUB's interval).
    assert found["optim"]["learning_rate"] == 6e-5 and found["optim"]["decay_steps"] == []
    assert found["optim"]["adam_epsilon"] == 1e-8
    _, settings = _settings("--precisions=float16,float32", "--pieces=step_float32,step_bfloat16,train")
    assert tool.selected_pieces(settings) == ["step_float32", "train"]  # bfloat16 is not among the precisions


def test_the_cub_subset_is_found_and_its_batch_fits_its_classes():
    root = cub_subset_dir()
    subset = root / "CUB_200_2011" if root else None
    if subset is None or not subset.is_dir():
        pytest.skip("../shared/data/cub200_subset is absent (only the project's CI has it)")
    # Independent counts from the official files: images per class id; ids <= 100 train, > 100 test.
    labels = [int(line.split()[1]) for line in (subset / "image_class_labels.txt").read_text().split("\n") if line]
    train_ids = sorted({c for c in labels if c <= 100})
    test_ids = sorted({c for c in labels if c > 100})
    for argv, classes in ((["--max_classes=5", "--batch_size=8"], 5), ([], None)):
        tool, settings = _settings(*argv)
        check = tool.Check(settings, time.monotonic(), "test")
        try:
            run, train, test, about = check.data()
        finally:
            check.cleanup()
        keep_train, keep_test = (train_ids[:classes], test_ids[:classes]) if classes else (train_ids, test_ids)
        assert about["dataset"] == "cub200" and pathlib.Path(about["data_dir"]).resolve() == subset.parent.resolve()
        assert (about["train_classes"], about["test_classes"]) == (len(keep_train), len(keep_test))
        assert about["train_images"] == len(train) == sum(c in keep_train for c in labels)
        assert about["test_images"] == len(test) == sum(c in keep_test for c in labels)
        if classes:
            assert about["batch_size"] == run.batch_size == 8 and "batch_note" not in about
        else:  # the paper's 128 needs 64 training classes; the subset has 58: batch 116, said in the JSON
            assert about["batch_size"] == run.batch_size == 2 * len(train_ids) == 116
            assert about["batch_note"].startswith("batch 116, not 128")
            assert "partial copy" in about["counts"]


# ------------------------------------------------------------------------------------------------ the pieces
def test_compare_runs_hand_worked():
    tool = load_tool("gpu_check")
    f16 = {"metrics": {"nmi": 0.512, "recall@1": 0.400}, "steps_done": 300}
    f32 = {"metrics": {"nmi": 0.500, "recall@1": 0.410}, "steps_done": 300}
    seed1 = {"metrics": {"nmi": 0.495, "recall@1": 0.380}, "steps_done": 300}
    found = tool.compare_runs(f16, f32, seed1)
    # differences +1.2 and -1.0 points; seed spread 0.5 and 3.0; tolerance max(2 x spread, 1) = 1.0 and 6.0
    assert found["difference_points"] == {"nmi": 1.2, "recall@1": -1.0}
    assert found["seed_spread_points"] == {"nmi": 0.5, "recall@1": 3.0}
    assert found["tolerance_points"] == {"nmi": 1.0, "recall@1": 6.0}
    assert found["within_spread"] is False  # NMI differs by 1.2 > 1.0
    seed1["metrics"]["nmi"] = 0.493  # spread 0.7 -> tolerance 1.4
    assert tool.compare_runs(f16, f32, seed1)["within_spread"] is True
    assert tool.compare_runs(f16, f32)["within_spread"] is None
    assert tool.compare_runs({"skipped": "budget"}, f32) is None


def test_budget_with_a_fake_clock():
    from hdml_tf.benchmarking import Budget
    now = [100.0]
    budget = Budget(60, margin=5, clock=lambda: now[0])
    now[0] = 130.0
    assert budget.elapsed() == 30 and budget.remaining() == 30
    assert budget.fits(25) and not budget.fits(25.5)  # 30 left, 5 kept back


def test_write_json_atomic_keeps_the_old_file_when_a_write_fails(tmp_path):
    from hdml_tf.benchmarking import write_json_atomic
    path = tmp_path / "out.json"
    write_json_atomic(path, {"a": np.float32(1.5), "b": np.arange(3)})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2]}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # not serializable: fails before anything is replaced
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left behind


class _FakeModel:
    """train_on_batch advances a fake clock by a fixed cost: timing without timing noise."""

    def __init__(self, clock, cost):
        self.clock, self.cost = clock, cost

    def train_on_batch(self, images, labels, return_dict=False):
        self.clock[0] += self.cost
        return {"loss": 1.0}


def test_interleaved_timing_and_paired_ratio_on_a_fake_clock(monkeypatch):
    from hdml_tf import benchmarking
    clock = [0.0]
    monkeypatch.setattr(benchmarking.time, "perf_counter", lambda: clock[0])
    base = benchmarking.TimedVariant("base", lambda: _FakeModel(clock, 0.2), 8, method="baseline")
    slow = benchmarking.TimedVariant("slow", lambda: _FakeModel(clock, 0.25), 8, method="hdml")
    broken = benchmarking.TimedVariant("broken", lambda: 1 / 0, 8, method="hdml")
    batch = ("images", "labels")
    for v in (base, slow, broken):
        v.warm_up(batch, None, steps=3)
    assert broken.error.startswith("ZeroDivisionError") and broken.model is None
    assert (slow.first_step_seconds, slow.warmup_seconds, slow.last_step_seconds) == (0.25, 0.75, 0.25)
    once = benchmarking.TimedVariant("once", lambda: _FakeModel(clock, 0.3), 8)
    once.warm_up(batch, None, steps=1)
    assert (once.first_step_seconds, once.last_step_seconds) == (0.3, None)  # one (tracing) step: no step time
    # One untimed step each (0.45 s), then rounds of 5 x 0.2 + 5 x 0.25 = 2.25 s: a budget of 6 s has room for two.
    budget = benchmarking.Budget(6, clock=lambda: clock[0])
    rounds = benchmarking.time_interleaved([base, slow, broken], batch, None, steps=5, rounds=4, fits=budget.fits)
    assert rounds == 2 and clock[0] - budget.start == pytest.approx(0.45 + 2 * 2.25)
    assert base.blocks == [(pytest.approx(0.2), pytest.approx(0.0, abs=1.0))] * 2
    summary = slow.summary()
    assert summary["step_seconds"] == 0.25 and summary["images_per_s"] == 32.0 and summary["method"] == "hdml"
    assert broken.summary() == {"method": "hdml", "batch_size": 8, "error": broken.error}
    ratio = benchmarking.paired_ratio(slow, base, target=1.1)
    assert (ratio["wall"], ratio["rounds"], ratio["target"], ratio["meets_target"]) == (1.25, 2, 1.1, False)
    assert ratio["cpu"] is None or ratio["cpu"] > 0  # real CPU time of fake steps: maybe below the clock's tick
    assert benchmarking.paired_ratio(broken, base) is None


@pytest.mark.parametrize("loss, size", [("npair", 6), ("triplet", 6), ("contrastive", 8)])
def test_make_batch_follows_the_tuple_layout(loss, size):
    from hdml_tf.benchmarking import make_batch
    images, labels = make_batch(loss, size, 32, num_classes=4, seed=1)
    labels = labels.numpy()
    assert images.shape == (size, 32, 32, 3) and labels.max() < 4
    from hdml_tf import layouts
    parts = np.split(labels, layouts.get(loss).size)
    np.testing.assert_array_equal(parts[0], parts[1])  # anchors and positives (positive pairs) share classes
    assert len(set(parts[0])) == len(parts[0])  # distinct classes
    if loss != "npair":
        assert not np.any(parts[-1] == parts[-2 if loss == "contrastive" else 0])  # negatives differ
    assert 0.0 <= float(np.min(images)) and float(np.max(images)) <= 255.0 and not math.isnan(float(np.std(images)))


def test_make_batch_refuses_too_few_classes():
    from hdml_tf.benchmarking import make_batch
    from hdml_tf.errors import DataError
    with pytest.raises(DataError, match="needs 4 distinct classes"):
        make_batch("npair", 8, 32, num_classes=3)
