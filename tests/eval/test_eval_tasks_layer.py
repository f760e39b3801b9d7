"""The scoring layer (flowkern.eval.tasks, re-exported by flowkern.eval) imports no torch and no transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scoring_layer_runs_without_torch(tmp_path):
    # torch blocked (``import torch`` raises ImportError). flowkern/__init__ loads the ops, which need torch, so the
    # package object is made without running it: what is checked is flowkern.eval and flowkern.eval.tasks alone.
    code = textwrap.dedent(f"""
        import json, sys, types
        sys.modules["torch"] = None
        package = types.ModuleType("flowkern")
        package.__path__ = [{str(ROOT / "flowkern")!r}]
        sys.modules["flowkern"] = package
        import flowkern.eval.tasks as tasks
        from flowkern.eval import TASKS, get_task
        from flowkern.eval.tasks.pope import pope_metrics
        from flowkern.eval.tasks.sqa import parse_option
        assert TASKS is tasks.TASKS and sorted(TASKS) == ["chair", "pope", "sqa", "textvqa"]
        assert parse_option("B. blue star") == "B"
        assert pope_metrics(["yes", "no"], ["yes", "yes"])["accuracy"] == 0.5
        path = {str(tmp_path / "coco_pope_random.json")!r}
        with open(path, "w") as f:
            f.write(json.dumps({{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?",
                                 "label": "yes"}}) + "\\n")
        task = get_task("pope", path)
        assert [s.reference for s in task.samples] == ["yes"]
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules if sys.modules[m])
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
