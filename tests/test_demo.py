"""`opsdc demo` end to end at smoke-test size: a 20-step base model, 2 OPSDC steps at TP=2.

The full-size demo (minutes) is run by `make demo`; its measured numbers are in bench/RESULTS.md.
This test checks the pipeline and its outputs, not the compression.
"""

import json
from dataclasses import replace

import matplotlib.image
import pytest

from opsdc_megatron.demo import run_demo
from opsdc_megatron.toy.base_model import BuildSettings

pytestmark = pytest.mark.parallel


def test_demo_writes_summary_and_plot(tmp_path):
    overrides = ["train.steps=2", "eval.every_steps=1", "eval.max_prompts=8", "rollout.max_response_tokens=32", "eval.max_response_tokens=32"]
    run_demo(tmp_path / "demo", tmp_path / "cache", overrides, test_prompts=16, base_settings=replace(BuildSettings(), steps=20))
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for when in ("before", "after"):
        for kind in ("plain", "instructed"):
            result = summary[when][kind]
            assert set(result) == {"accuracy", "mean_tokens", "n"}
            assert result["n"] == 16 and 0 <= result["accuracy"] <= 1 and 1 <= result["mean_tokens"] <= 32
    image = matplotlib.image.imread(tmp_path / "demo" / "training_curves.png")
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    assert (tmp_path / "demo" / "train" / "best_hf" / "model.safetensors").exists()
