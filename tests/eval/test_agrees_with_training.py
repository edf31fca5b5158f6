"""The eval stage reproduces what training logged: the main job's held-out accuracies before and after RL, read
back from its checkpoint directories alone (model, tokenizer and template from model.json), are equal, not close."""
import json

from alignment import stages
from alignment.config import config_path, load_config_file


def test_eval_reproduces_the_held_out_accuracies_grpo_logged(tmp_path):
    grpo = load_config_file(config_path("grpo"))
    grpo.steps, grpo.checkpoint.every, grpo.checkpoint.async_save = 3, 0, False
    grpo.rl.update(prompts_per_step=4, num_samples=4, eval_every=0)
    grpo.data.num_embedded_eval = 48
    grpo.warm_start.steps, grpo.warm_start.eval_every, grpo.warm_start.checkpoint.async_save = 120, 0, False
    stages.run("grpo", grpo, str(tmp_path / "grpo"))
    curve = [json.loads(line) for line in open(tmp_path / "grpo" / "curve.jsonl")]
    before, after = curve[0]["accuracy"], curve[-1]["accuracy"]

    config = load_config_file(config_path("eval"))
    config.checkpoints = f"warm={tmp_path / 'grpo' / 'warm_start'},grpo={tmp_path / 'grpo'}"
    config.arithmetic.num_problems = grpo.data.num_embedded_eval  # the rest of the defaults are the main job's
    summary = stages.run("eval", config, str(tmp_path / "eval"))
    assert summary["warm"]["arithmetic"]["accuracy"] == before
    assert summary["grpo"]["arithmetic"]["accuracy"] == after
    assert 0 < before and 0 < after  # a real comparison, not two zeros, of two different models:
    results = json.load(open(tmp_path / "eval" / "results.json"))
    responses = {name: [s["response"] for s in results[name]["arithmetic"]["samples"]] for name in ("warm", "grpo")}
    assert responses["warm"] != responses["grpo"]
