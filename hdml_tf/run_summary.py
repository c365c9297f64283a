"""What the end of a training run tells a person: where everything went, what to open first, what to run next.

    run directory: runs/demo
      curves_hdml.png       training curves (losses, pull factor, synthetic weight)
      results.json          configuration and every score in the table above
      hdml.keras            the trained model (tools/evaluate.py, tools/export.py, load_keras)
    next:
      python tools/evaluate.py --model=runs/demo --plots_dir=runs/demo/plots
      python tools/export.py --checkpoint=runs/demo --output=runs/demo/saved_model

File names come from `hdml_tf.rundir.RunDir`; only files that exist are named.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import List, Optional, Sequence

from hdml_tf.rundir import RunDir

_TOOLS = Path(__file__).resolve().parents[1] / "tools"


def display_path(path, cwd: Optional[str] = None) -> str:
    """`path` relative to the working directory when it lies below it, else absolute (shell-quoted if needed)."""
    absolute = os.path.abspath(path)
    cwd = os.path.abspath(cwd or os.getcwd())
    relative = os.path.relpath(absolute, cwd)
    shown = relative if not relative.startswith("..") else absolute
    return shlex.quote(shown)


def tool_command(tool: str, cwd: Optional[str] = None) -> str:
    """"python tools/<tool>.py" as it can be typed in `cwd` (the checkout's tools/ folder when it is there)."""
    script = _TOOLS / f"{tool}.py"
    return f"python {display_path(script, cwd) if script.is_file() else f'tools/{tool}.py'}"


def summary_lines(out: RunDir, variants: Sequence[str], cwd: Optional[str] = None) -> List[str]:
    """The end-of-run lines: the run directory, its files a person opens first (existing ones only), and the
    commands that evaluate and export the first variant.

    Args:
      out: the run directory.
      variants: the trained variants ("hdml", "baseline"), the first one is the main one.
      cwd: directory the paths are shown relative to (default: the working directory).
    """
    directory = display_path(out.path, cwd)
    files = []
    for variant in variants:
        files.append((out.curves(variant), f"training curves of {variant} (losses, pull factor, synthetic weight)"))
    files.append((out.results, "configuration and every score of the table above"))
    for variant in variants:
        files.append((out.keras(variant), f"the trained {variant} model (evaluate, export or resume it)"))
        files.append((out.best_weights(variant), f"the {variant} checkpoint selected during training"))
    files = [(path, what) for path, what in files if path.is_file()]
    lines = [f"run directory: {directory}"]
    width = max([len(path.name) for path, _ in files] + [0])
    lines += [f"  {path.name:<{width}}  {what}" for path, what in files]
    logs = out.path / "logs"
    if logs.is_dir():
        lines.append(f"  {'logs/':<{width}}  TensorBoard: tensorboard --logdir={display_path(logs, cwd)}")
    main = variants[0] if variants else None
    if main and (out.keras(main).is_file() or out.weights(main).is_file()):
        pick = f" --variant={main}" if out.variants()[0] != main else ""  # the tools' default is hdml when there
        lines.append("next:")
        lines.append(f"  {tool_command('evaluate', cwd)} --model={directory}{pick} "
                     f"--plots_dir={display_path(out.path / 'plots', cwd)}")
        lines.append(f"  {tool_command('export', cwd)} --checkpoint={directory}{pick} "
                     f"--output={display_path(out.path / 'saved_model', cwd)}")
    return lines
