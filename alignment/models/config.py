"""Model hyper-parameters: one frozen dataclass for Llama-2, Llama-3/3.1 and Qwen2, plus HF conversion."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import os
from typing import Any, Mapping

DTYPES = ("float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("auto", *DTYPES)  # model.dtype in a config; 'auto' is resolved by resolve_compute_dtype
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 /proc/cpuinfo flags of native bf16 dot-product instructions
AUTO_DTYPE_VARIABLE = "ALIGNMENT_AUTO_DTYPE"  # overrides the detection of what 'auto' resolves to
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

logger = logging.getLogger(__name__)


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset:
    """The first processor's flags in `path`; empty where there is no such file (not Linux) or no flags line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(platform: str, flags: frozenset = frozenset(), gpu_capability: str = "") -> tuple[bool, str]:
    """(whether bf16 matmuls run natively, why): every TPU; a GPU of compute capability 8.0 or newer (Ampere on:
    bf16 tensor cores); a CPU with AMX-BF16 or AVX512-BF16. Anything else (older GPUs, other CPUs) is emulated."""
    if platform == "tpu":
        return True, "TPU"
    if platform in ("gpu", "cuda", "rocm"):
        ok = platform == "rocm" or (gpu_capability != "" and float(gpu_capability) >= 8.0)
        return ok, f"{platform} compute capability {gpu_capability or 'unknown'}"
    found = sorted(f for f in BF16_CPU_FLAGS if f in flags)
    return bool(found), f"{platform} with {', '.join(found)}" if found else f"{platform} without {BF16_CPU_FLAGS}"


@functools.lru_cache(maxsize=None)
def auto_compute_dtype() -> str:
    """'bfloat16' where this process's default backend has native bf16 matmul, else 'float32'; logged once. The
    environment variable ALIGNMENT_AUTO_DTYPE (float32 | bfloat16), when set, is taken instead of the detection
    (the test suite sets float32, so its numerics are the same on every machine)."""
    import jax  # here: parsing and checking model configs needs no backend

    pinned = os.environ.get(AUTO_DTYPE_VARIABLE, "")
    if pinned:
        if pinned not in ("float32", "bfloat16"):
            raise ValueError(f"{AUTO_DTYPE_VARIABLE}={pinned!r} must be float32 or bfloat16 (or unset: detected)")
        logger.info("model.dtype 'auto' -> %s (%s is set)", pinned, AUTO_DTYPE_VARIABLE)
        return pinned
    device = jax.devices()[0]
    native, why = native_bf16(jax.default_backend(), cpu_flags(), str(getattr(device, "compute_capability", "")))
    dtype = "bfloat16" if native else "float32"
    logger.info("model.dtype 'auto' -> %s (%s): %s", dtype, why,
                "bf16 compute over float32 parameters" if native else "no native bf16 matmul")
    return dtype


def resolve_compute_dtype(value: str) -> str:
    """model.dtype as the model runs it: 'auto' becomes auto_compute_dtype(); a dtype name stays as it is."""
    if value not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype must be one of {list(COMPUTE_DTYPES)}, got {value!r}")
    return auto_compute_dtype() if value == "auto" else value


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `type` is 'linear' (positions / factor) or 'llama3' (Llama-3.1 wavelength bands)."""

    type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.type not in ("linear", "llama3"):
            raise ValueError(f"rope_scaling.type must be 'linear' or 'llama3', got {self.type!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: RMSNorm, RoPE, GQA attention, SwiGLU MLP."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False  # Qwen2 small sizes share the embedding with the output head
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v projections
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms, softmax and losses always accumulate in float32
    attention_impl: str = "xla"
    logprob_impl: str = ""  # output-head log-prob kernel (kernels/logprob_kl); '' = the backend's default
    remat_policy: str = "none"  # what the backward pass may keep instead of recomputing
    remat_group_size: int = 1  # remat every group of this many consecutive layers (the paper's grouping)
    scan_layers: bool = True  # loop one compiled layer group (compile time flat in depth); False unrolls the
    # layers, which runs small models ~10% faster on CPU (MaxText's `scan_layers`)
    value_head: bool = False  # scalar head for reward models and critics

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_position_embeddings", "remat_group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.head_dim, int) or self.head_dim < 0:
            raise ValueError(f"model config: head_dim must be 0 (hidden_size // num_heads) or positive, got "
                             f"{self.head_dim!r}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(f"model config: rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) "
                             "must be positive")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        checks = [
            (self.num_heads % self.num_kv_heads == 0,
             f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"),
            (self.param_dtype in DTYPES, f"param_dtype must be one of {DTYPES}, got {self.param_dtype!r}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (self.remat_policy in REMAT_POLICIES,
             f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}"),
            (self.remat_group_size >= 1 and self.num_layers % self.remat_group_size == 0,
             f"remat_group_size ({self.remat_group_size}) must divide num_layers ({self.num_layers})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"model config: {message}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Build from a plain mapping (e.g. `config.model`), naming unknown keys with the nearest valid one; a dtype
        of 'auto' is resolved for this machine (`resolve_compute_dtype`)."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in valid:
                near = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"unknown model config key {key!r}{hint}")
        values = dict(values)
        if "dtype" in values:
            values["dtype"] = resolve_compute_dtype(values["dtype"])
        return cls(**values)

    def num_params(self) -> int:
        d, f, dh = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * dh * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += dh * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        value = d + 1 if self.value_head else 0
        return self.vocab_size * d + self.num_layers * per_layer + d + head + value

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 * matmul params + causal attention scores."""
        matmul_params = self.num_params() - self.vocab_size * self.hidden_size * (0 if self.tie_embeddings else 1)
        matmul_params += self.vocab_size * self.hidden_size  # the output head is a matmul even when tied
        matmul_params -= (2 * self.num_layers + 1) * self.hidden_size  # norms are not matmuls
        attention = 6 * self.num_layers * self.num_heads * self.head_dim * seq_len  # QK^T and AV, causal half, x3
        return 6 * matmul_params + attention


_HF_ARCHS = {"llama": dict(), "qwen2": dict(qkv_bias=True)}


def from_hf_config(source: str | Mapping[str, Any], **overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face `config.json` (path, directory or parsed dict) for Llama or Qwen2."""
    if isinstance(source, (str, os.PathLike)):
        path = os.path.join(source, "config.json") if os.path.isdir(source) else str(source)
        try:
            with open(path) as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"HF config not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    else:
        path, hf = "<dict>", dict(source)
    model_type = hf.get("model_type")
    if model_type not in _HF_ARCHS:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; supported: {sorted(_HF_ARCHS)}")
    if hf.get("use_sliding_window"):
        raise ValueError(f"{path}: use_sliding_window=true is not supported")
    for key in ("attention_bias", "mlp_bias"):
        if model_type == "llama" and hf.get(key):
            raise ValueError(f"{path}: Llama with {key}=true (biases on every projection) is not supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"{path}: missing required key {key!r}")
    # transformers >= 5 keeps RoPE settings in `rope_parameters`; older files use rope_theta/rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling_dict = hf.get("rope_scaling") or rope
    rope_type = scaling_dict.get("rope_type", scaling_dict.get("type", "default"))
    if rope_type in ("default", None):
        scaling = None
    elif rope_type in ("linear", "llama3"):
        scaling = RopeScaling(
            type=rope_type,
            factor=float(scaling_dict["factor"]),
            low_freq_factor=float(scaling_dict.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling_dict.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(scaling_dict.get("original_max_position_embeddings", 8192)),
        )
    else:
        raise ValueError(f"{path}: rope type {rope_type!r} is not supported (default, linear, llama3)")
    num_heads = hf["num_attention_heads"]
    values = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=_HF_ARCHS[model_type].get("qkv_bias", False),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )
    values.update(overrides)
    return ModelConfig(**values)


def to_hf_config(config: ModelConfig, model_type: str = "llama") -> dict:
    """The HF `config.json` dict for `config` (Llama or Qwen2)."""
    if model_type not in _HF_ARCHS:
        raise ValueError(f"model_type must be one of {sorted(_HF_ARCHS)}, got {model_type!r}")
    if config.qkv_bias != (model_type == "qwen2"):
        raise ValueError(f"q/k/v biases ({config.qkv_bias}) exist in Qwen2 and not in Llama; cannot export as {model_type!r}")
    hf = dict(
        architectures=["LlamaForCausalLM" if model_type == "llama" else "Qwen2ForCausalLM"],
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        hidden_act="silu",
        torch_dtype=config.param_dtype,
    )
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    if config.rope_scaling is not None:
        rope = dataclasses.asdict(config.rope_scaling)
        rope["rope_type"] = rope.pop("type")
        hf["rope_scaling"] = rope
    return hf
