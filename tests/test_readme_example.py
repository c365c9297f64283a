"""The README's "From your own training script" block, run exactly as written (so the example can never rot)."""
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- readme-example:start -->\n```python\n(.*?)```\n<!-- readme-example:end -->", text, re.S)
    assert found, "README.md lost its marked example block"
    return found.group(1)


def test_readme_example_runs_verbatim(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1", MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # It printed the paper-style table of the trained network ...
    table = [line for line in done.stdout.splitlines() if line.startswith("trained")]
    assert len(table) == 1 and len(table[0].split()) == 1 + 8  # NMI F1 R@1 R@2 R@4 R@8 MAP@R RP
    # ... and wrote a SavedModel that loads with TensorFlow alone and returns unit-length embeddings.
    import tensorflow as tf
    loaded = tf.saved_model.load(str(tmp_path / "exported" / "digits"))
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3)).astype("float32")
    embeddings = loaded.signatures["serving_default"](images=tf.constant(images))["embeddings"].numpy()
    assert embeddings.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)


def test_public_api_names_resolve_and_import_is_light():
    """Every name hdml_tf exports resolves to the object of its home module, and `import hdml_tf` alone does not
    import TensorFlow (names load on first use)."""
    code = ("import sys, hdml_tf; assert 'tensorflow' not in sys.modules, 'import hdml_tf imported TensorFlow'; "
            "import importlib; "
            "[getattr(hdml_tf, n) for n in hdml_tf.__all__]; "
            "assert hdml_tf.HDMLModel is importlib.import_module('hdml_tf.model').HDMLModel; "
            "assert hdml_tf.layouts.get('triplet').size == 3; print(len(hdml_tf.__all__))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) >= 30
