"""model.dtype 'auto': bf16 compute where the hardware multiplies bf16 natively (TPU, Ampere+ GPUs, CPUs with
AMX-BF16 or AVX512-BF16), float32 elsewhere; resolved once, before the model is built; a config can force
either; a bad value fails naming the key."""
import logging

import ml_collections
import pytest

from alignment import config as config_lib
from alignment import stages
from alignment.models import config as model_config_lib
from alignment.models.config import cpu_flags, native_bf16, resolve_compute_dtype
from alignment.train import runtime

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture
def cpu_with(monkeypatch):
    """cpu_with(*flags): this process's CPU reports exactly `flags` (the tests run on the CPU backend), with the
    suite's pin of 'auto' (conftest) lifted."""
    monkeypatch.delenv(model_config_lib.AUTO_DTYPE_VARIABLE, raising=False)

    def set_flags(*flags):
        monkeypatch.setattr(model_config_lib, "cpu_flags", lambda path="/proc/cpuinfo": frozenset(flags))
        model_config_lib.auto_compute_dtype.cache_clear()

    yield set_flags
    model_config_lib.auto_compute_dtype.cache_clear()


def run_config(dtype: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(init_from="", model=dict(TINY, dtype=dtype)))


def test_cpu_flags_reads_the_first_processor_and_tolerates_no_file(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "absent")) == frozenset()


@pytest.mark.parametrize("platform, flags, capability, native", [
    ("tpu", (), "", True),
    ("gpu", (), "9.0", True),  # H100
    ("gpu", (), "8.0", True),  # A100
    ("gpu", (), "7.0", False),  # V100: no bf16 tensor cores
    ("cpu", ("avx2", "avx512f", "avx512_bf16"), "", True),  # AMD Zen 4, Intel Cooper Lake
    ("cpu", ("avx2", "amx_bf16", "amx_tile"), "", True),  # Intel Sapphire Rapids
    ("cpu", ("avx2", "avx512f"), "", False),
    ("cpu", (), "", False),
])
def test_native_bf16_by_backend_and_cpu_flags(platform, flags, capability, native):
    assert native_bf16(platform, frozenset(flags), capability)[0] is native


def test_auto_picks_bf16_on_a_cpu_with_bf16_instructions_and_says_so(cpu_with, caplog):
    cpu_with("avx2", "avx512f", "avx512_bf16")
    with caplog.at_level(logging.INFO, logger="alignment.models.config"):
        model_cfg = runtime.model_config(run_config("auto"))
    assert (model_cfg.dtype, model_cfg.param_dtype) == ("bfloat16", "float32")  # bf16 compute over fp32 weights
    assert "model.dtype 'auto' -> bfloat16 (cpu with avx512_bf16)" in caplog.text


def test_auto_picks_float32_elsewhere(cpu_with):
    cpu_with("avx2", "avx512f")
    assert runtime.model_config(run_config("auto")).dtype == "float32"


@pytest.mark.parametrize("flags, forced", [(("avx512_bf16",), "float32"), ((), "bfloat16")])
def test_a_config_can_force_either(cpu_with, flags, forced):
    cpu_with(*flags)
    assert runtime.model_config(run_config(forced)).dtype == forced


def test_the_environment_pins_auto_and_a_bad_pin_is_named(cpu_with, monkeypatch):
    cpu_with("avx512_bf16")
    monkeypatch.setenv("ALIGNMENT_AUTO_DTYPE", "float32")
    assert runtime.model_config(run_config("auto")).dtype == "float32"
    assert runtime.model_config(run_config("bfloat16")).dtype == "bfloat16"  # a forced dtype is not touched
    model_config_lib.auto_compute_dtype.cache_clear()
    monkeypatch.setenv("ALIGNMENT_AUTO_DTYPE", "bf16")
    with pytest.raises(ValueError, match="ALIGNMENT_AUTO_DTYPE='bf16' must be float32 or bfloat16"):
        runtime.model_config(run_config("auto"))


def test_a_bad_value_names_the_key():
    with pytest.raises(ValueError, match=r"model.dtype must be one of \['auto', 'float32', 'bfloat16', 'float16'\], "
                                         r"got 'bf16'"):
        resolve_compute_dtype("bf16")
    config = config_lib.load_config_file(config_lib.config_path("sft"))
    config.model.dtype = "bf16"
    with pytest.raises(ValueError, match=r"config.model.dtype='bf16' is not one of"):
        stages.check(config)


def test_shipped_configs_default_to_auto():
    for name in ("sft", "rm", "dpo", "ppo", "models/tiny", "models/llama3_8b", "models/qwen2_7b"):
        config = config_lib.load_config_file(config_lib.config_path(name))
        assert (config.model if "model" in config else config).dtype == "auto", name
