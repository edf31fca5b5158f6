"""LoRA SFT through the stage: only the adapters train and are checkpointed, a stopped run resumes exactly,
the base is FSDP-sharded and the adapters sharded by the same rules, QLoRA trains and its loss falls."""
import json
import os

import flax.linen
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from alignment import stages
from alignment.config import load_config_file
from alignment.models.transformer import dummy_inputs
from tests import persistent_compilation_cache


@pytest.fixture
def compilation_cache(tmp_path):
    yield from persistent_compilation_cache(str(tmp_path / "jax_cache"))


def config(steps: int, **lora):
    c = load_config_file("configs/sft_lora.py")
    c.warm_start = None
    c.model.num_layers, c.model.hidden_size, c.model.intermediate_size = 2, 64, 128
    c.mesh.fsdp = 2
    c.steps, c.batch_size = steps, 8
    c.optimizer.schedule, c.optimizer.warmup_steps = "constant", 0
    c.log_every, c.eval_every = 1, 0
    c.data.num_embedded, c.data.num_embedded_eval, c.data.max_length = 200, 16, 64
    c.checkpoint.async_save, c.checkpoint.every = False, 3
    c.lora.update(lora)
    return c


def state_at(workdir, step):
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


def losses(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["loss"] for r in records if r["split"] == "train"]


def test_lora_sft_checkpoints_only_adapters_and_resumes_exactly(tmp_path, compilation_cache):
    stages.run("sft", config(6, dropout=0.1), str(tmp_path / "full"))
    saved = state_at(tmp_path / "full", 6)
    assert sorted(saved["params"]) == ["full", "lora"] and saved.get("frozen") is None  # no base weights
    names = sorted(saved["params"]["lora"]["layers"])
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    q = saved["params"]["lora"]["layers"]["q_proj"]
    assert q["a"].shape == (2, 64, 8) and q["b"].shape[:2] == (2, 8) and np.abs(q["b"]).max() > 0
    info = json.load(open(tmp_path / "full" / "checkpoints" / "lora.json"))
    assert info["spec"]["rank"] == 8 and info["base"] == ""

    # merge_lora: the newest adapters folded into the base, as an HF checkpoint with the adapted model's logits.
    from alignment.models import Transformer, lora
    from alignment.models.hf import load_hf_checkpoint
    from alignment.train.adapters import merge_lora
    merge_lora(str(tmp_path / "full"), str(tmp_path / "merged"))
    model_cfg, merged = load_hf_checkpoint(str(tmp_path / "merged"))
    model = Transformer(model_cfg)
    base = flax.linen.meta.unbox(model.init(jax.random.split(jax.random.key(0))[0], *dummy_inputs())["params"])
    spec = lora.LoraSpec(**info["spec"])
    tokens, positions, segments = dummy_inputs(2, 9)
    tokens = tokens + 7

    def logits(params):
        return np.asarray(model.apply({"params": params}, model.apply({"params": params}, tokens, positions, segments),
                                      method="logits"))

    np.testing.assert_allclose(logits(merged), logits(lora.bind(base, saved["params"], spec)), atol=2e-5)
    from alignment.checkpoint import load_params
    with pytest.raises(ValueError, match="holds LoRA adapters, not a whole model.*merge_lora"):
        load_params(str(tmp_path / "full" / "checkpoints"), base, jax.tree.map(lambda _: None, base))

    stages.run("sft", config(3, dropout=0.1), str(tmp_path / "resumed"))
    stages.run("sft", config(6, dropout=0.1), str(tmp_path / "resumed"))
    resumed = state_at(tmp_path / "resumed", 6)
    for a, b in zip(jax.tree.leaves(resumed["params"]) + jax.tree.leaves(resumed["opt_state"]),
                    jax.tree.leaves(saved["params"]) + jax.tree.leaves(saved["opt_state"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("quantize", ["nf4"])
def test_qlora_sft_loss_falls(tmp_path, quantize, compilation_cache):
    c = config(12, quantize=quantize)
    c.checkpoint.every = 0
    stages.run("sft", c, str(tmp_path))
    curve = losses(tmp_path)
    assert np.mean(curve[-3:]) < np.mean(curve[:3]) - 0.25, curve  # 6.66 -> 6.26 in the last run


def test_bad_lora_values_fail_before_any_work(tmp_path):
    for key, value, message in [("quantize", "nf5", "lora.quantize='nf5' is not one of"),
                                ("targets", "layers/(q", "not a regular expression"),
                                ("rank", 0, "lora.rank=0 must be > 0")]:
        c = config(1, **{key: value})
        with pytest.raises(ValueError, match=message):
            stages.run("sft", c, str(tmp_path / key))
        assert not os.path.exists(tmp_path / key) or not os.listdir(tmp_path / key)
