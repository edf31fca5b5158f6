"""PEFT format: our adapters exported load onto the transformers model with PEFT and give our logits (fp32,
1e-4); a PEFT adapter imports back to the same arrays."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.models import ModelConfig, Transformer, lora
from alignment.models.hf import save_hf_checkpoint
from alignment.models.lora_peft import export_peft, import_peft
from alignment.models.transformer import dummy_inputs

torch = pytest.importorskip("torch", reason="the hf extra (torch, transformers, peft) is not installed")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[hf]')")

CONFIG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("rslora,targets", [(False, lora.ALL_PROJECTIONS), (True, r"layers/(q|v|down)_proj")])
def test_exported_adapter_loads_in_peft_with_our_logits_and_imports_back(tmp_path, rslora, targets):
    spec = lora.LoraSpec(targets=targets, rank=4, alpha=8.0, rslora=rslora)
    model = Transformer(CONFIG)
    boxed = jax.eval_shape(lambda k: model.init(k, *dummy_inputs())["params"], jax.random.key(0))
    params = nn.meta.unbox(model.init(jax.random.key(0), *dummy_inputs())["params"])
    adapters = lora.init_adapters(jax.random.key(1), nn.meta.unbox(lora.adapter_shapes(boxed, spec)), spec)
    keys = iter(jax.random.split(jax.random.key(2), 32))
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.1 * jax.random.normal(next(keys), x.shape) if p[-1].key == "b" else x, adapters)
    save_hf_checkpoint(tmp_path / "base", CONFIG, params)
    export_peft(str(tmp_path / "adapter"), adapters, spec, base_model=str(tmp_path / "base"))

    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 9))
    positions = np.broadcast_to(np.arange(9), (2, 9))
    bound = lora.bind(params, adapters, spec)
    hidden = model.apply({"params": bound}, jnp.asarray(tokens), jnp.asarray(positions), jnp.ones((2, 9), jnp.int32))
    ours = np.asarray(model.apply({"params": bound}, hidden, method="logits"))

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = with_adapter(torch.as_tensor(tokens)).logits.numpy()
        with with_adapter.disable_adapter():
            plain = with_adapter(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(theirs - plain).max() > 1e-3  # the adapter is applied
    assert np.abs(ours - theirs).max() < 1e-4

    imported, imported_spec = import_peft(str(tmp_path / "adapter"), params["layers"])
    assert (imported_spec.rank, imported_spec.alpha, imported_spec.rslora) == (4, 8.0, rslora)
    assert lora.target_paths(params, imported_spec) == lora.target_paths(params, spec)
    for keys, ab in lora.adapter_items(adapters):
        got = lora._get(imported["lora"], keys)
        np.testing.assert_array_equal(got["a"], np.asarray(ab["a"]))
        np.testing.assert_array_equal(got["b"], np.asarray(ab["b"]))


def test_unsupported_peft_configs_fail_by_name(tmp_path):
    import json
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head"]}))
    with pytest.raises(ValueError, match=r"target_modules \['lm_head'\] are not projections"):
        import_peft(str(tmp_path), {})
