"""Whole programs with the Pallas kernels lowered for TPU and GPU on a mesh of 8 simulated CPU devices.

The real step functions of the stages (the sharded SFT train step, GRPO's update, scoring and PTX-KL steps,
the generation engine's prefill and decode programs over the paged KV cache), with attention_impl="pallas" and the fused log-prob
kernels, traced for the foreign platform (`kernels.dispatch.target_platform`) and lowered with
`lowering_platforms`: the kernels inside shard_map, scan, remat and custom VJPs, on a data x fsdp x tensor
mesh. Lowering only; a kernel that fails is named with its shapes (`kernels.lowering.CrossLoweringError`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from alignment import sharding
from alignment.algorithms import grpo
from alignment.algorithms.sft import sft_loss
from alignment.generation import paged, sampling
from alignment.models import ModelConfig, Transformer
from alignment.models.transformer import dummy_inputs
from alignment.rl.scoring import make_scorer
from alignment.train.optimizer import make_optimizer
from alignment.train.state import state_shardings
from alignment.train.step import jit_train_step, make_train_step
from alignment_kernels import lowering
from alignment_kernels.paged_attention import api as paged_api

PLATFORMS = ("tpu", "cuda")
# Llama-shaped and small: head_dim 128, GQA 4/2 heads (each tensor shard holds whole kv heads), bf16 compute.
MODEL = dict(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=128, dtype="bfloat16", attention_impl="pallas", logprob_impl="pallas")
OPTIMIZER = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0, schedule="constant", end_lr_factor=1.0,
                                           b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
# Qwen2-0.5B's attention and hidden size (the GRPO model of the device check): 14/2 heads of 64, D 896 (not a
# power of two, which the GPU log-prob kernels chunk).
QWEN_SHAPED = dict(hidden_size=896, num_heads=14, num_kv_heads=2, head_dim=64)
MESH = dict(data=2, fsdp=2, tensor=2)
RULES = sharding.DEFAULT_RULES


@pytest.fixture(scope="module", autouse=True)
def tpu_chip():
    lowering.register_tpu_chip("v5e")


def setup(mesh_axes=MESH, **model_overrides):
    """(model, mesh, optimizer, schedule, abstract train state, its shardings)."""
    model = Transformer(ModelConfig(**{**MODEL, **model_overrides}))
    mesh = sharding.make_mesh(mesh_axes)
    optimizer, schedule = make_optimizer(OPTIMIZER, 10)
    abstract, shardings = state_shardings(model, optimizer, mesh, RULES, dummy_inputs())
    return model, mesh, optimizer, schedule, abstract, shardings


def rows_of(mesh, shapes: dict) -> dict:
    """ShapeDtypeStructs with rows over the data axes, from {name: (shape, dtype)}."""
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.named_sharding(
        mesh, RULES, "batch", *(None,) * (len(shape) - 1))) for name, (shape, dtype) in shapes.items()}


def check_program(fn, args, platform, mesh, what, **kwargs):
    """Trace fn(*args) for platform under the activation-sharding mesh, lower it, check its kernels."""
    with sharding.activation_sharding(mesh, RULES):
        traced = lowering.trace(fn, args, platform, **kwargs)
    lowered = lowering.lower(traced, platform, what)
    count = lowering.expect_kernels(lowered, platform)
    problems = lowering.vmem_problems(traced.jaxpr) if platform == "tpu" else lowering.register_problems(traced.jaxpr)
    assert not problems, f"{what} on {platform}:\n" + "\n".join(problems)
    return traced, count


@pytest.mark.parametrize("mesh_axes, remat", [(MESH, "none"), (dict(data=2, fsdp=2, sequence=2), "full")],
                         ids=["data-fsdp-tensor", "sequence-parallel-remat"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_sft_train_step_lowers(platform, mesh_axes, remat):
    """Packed rows of 1000 tokens (no block divides them); Ulysses + full remat in the second mesh."""
    model, mesh, optimizer, schedule, abstract, shardings = setup(mesh_axes, remat_policy=remat)
    rows, seq = 8, 1000
    target = sharding.named_sharding(mesh, RULES, "batch", "seq")
    batch = {name: jax.ShapeDtypeStruct((rows, seq), jnp.bool_ if name == "loss_mask" else jnp.int32, sharding=target)
             for name in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
    step = jit_train_step(make_train_step(functools.partial(sft_loss, model), optimizer, schedule), shardings, target)
    _, count = check_program(step, (abstract, batch), platform, mesh, f"SFT train step on {mesh_axes}")
    assert count >= 6  # attention forward, dq, dkv (the scanned layer) + log-prob forward, dhidden, dW


def rollout_batch(mesh, group: int, prompts: int, prompt_len: int, completion: int, topk: int = 0) -> dict:
    """The completion-window rows GRPO's update and scoring read (`data.rl_rows.completion_rows`)."""
    rows, width = group * prompts, prompt_len + completion - 1
    shapes = {name: ((rows, width), jnp.int32) for name in ("inputs", "positions", "segment_ids")}
    shapes.update(targets=((rows, completion), jnp.int32), first_pass=((rows,), jnp.float32))
    shapes.update({name: ((rows, completion), jnp.float32) for name in ("loss_mask", "advantages", "old_logp",
                                                                          "ref_logp")})
    if topk:
        shapes.update(ref_topk_ids=((rows, completion, topk), jnp.int32),
                      ref_topk_logprobs=((rows, completion, topk), jnp.float32))
    return rows_of(mesh, shapes)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_grpo_update_lowers(platform):
    """The single-pass k3 update, each prompt run once into a KV cache its G samples attend to (group > 1)."""
    model, mesh, optimizer, schedule, abstract, shardings = setup(**QWEN_SHAPED)
    group, completion = 4, 192
    loss = functools.partial(grpo.grpo_loss, model, temperature=1.0, clip_low=0.2, clip_high=0.28, kl_mode="k3",
                             beta=0.02, aggregation="token_mean", max_tokens=completion, group=group)
    update = jit_train_step(make_train_step(loss, optimizer, schedule), shardings, None)
    batch = rollout_batch(mesh, group, prompts=4, prompt_len=100, completion=completion)
    check_program(update, (abstract, batch), platform, mesh, "GRPO update (k3, shared prompts)")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_grpo_scoring_and_ptx_kl_lower(platform):
    """The paper's top-K KL: in scoring (policy vs reference, forward) and in the PTX-KL step (with gradients)."""
    model, mesh, optimizer, schedule, abstract, shardings = setup(**QWEN_SHAPED)
    batch = rollout_batch(mesh, group=4, prompts=4, prompt_len=100, completion=192)
    score = make_scorer(model, 1.0, "top_k", 64, group=4)
    check_program(score, (abstract.params, abstract.params, batch), platform, mesh, "GRPO scoring (top-K KL)")

    ptx = jit_train_step(make_train_step(functools.partial(grpo.ptx_kl_loss, model, gamma=0.1), optimizer, schedule),
                         shardings, None)
    rows, seq, k = 8, 300, 64
    sft_batch = rows_of(mesh, {name: ((rows, seq), jnp.int32) for name in ("inputs", "targets", "positions",
                                                                            "segment_ids")})
    sft_batch.update(rows_of(mesh, {"loss_mask": ((rows, seq), jnp.bool_), "ref_topk_ids": ((rows, seq, k), jnp.int32),
                                    "ref_topk_logprobs": ((rows, seq, k), jnp.float32)}))
    check_program(ptx, (abstract, sft_batch), platform, mesh, "PTX-KL step (top-K KL with gradients)")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_generation_programs_lower(platform):
    """The engine's prefill (prompt chunks written into the paged KV cache) and its decode while_loop, both
    attending through the paged-attention kernel, with the cache's pages split over the data shards."""
    model, mesh, _, _, abstract, _ = setup(**QWEN_SHAPED)
    c = model.config
    rows, chunk, per_row, pages, page_size = 8, 64, 16, 4 * 64, 16  # 4 data shards of 64 pages
    layout = paged.Layout(mesh, RULES)
    page_spec = jax.ShapeDtypeStruct((c.num_kv_heads, pages, page_size, c.head_dim), jnp.bfloat16,
                                     sharding=jax.sharding.NamedSharding(mesh, layout.pages))
    pool = {"k": (page_spec,) * c.num_layers, "v": (page_spec,) * c.num_layers}
    settings = sampling.stack_params([sampling.SamplingParams(temperature=1.0)] * rows)
    settings = rows_of(mesh, {name: (value.shape, value.dtype) for name, value in settings.items()})
    draws = rows_of(mesh, {name: ((rows,), jnp.int32) for name in ("seeds", "samples", "drawn")})
    attention = lambda *args: paged_api.paged_attention(*args)  # resolved when traced: the target's kernel
    prefill = jax.jit(functools.partial(paged.prefill_program, model, attention=attention, layout=layout))
    args = rows_of(mesh, dict(tokens=((rows, chunk), jnp.int32), positions=((rows, chunk), jnp.int32),
                              page_table=((rows, per_row), jnp.int32), kv_lens=((rows,), jnp.int32),
                              last=((rows,), jnp.int32)))
    check_program(prefill, (abstract.params, pool, *args.values(), *draws.values(), settings), platform, mesh,
                  "generation prefill (paged)")
    decode = jax.jit(functools.partial(paged.decode_program, model, attention=attention, views=False,
                                       layout=layout), static_argnames=("steps", "pad_id"))
    args = rows_of(mesh, dict(tokens=((rows,), jnp.int32), kv_lens=((rows,), jnp.int32),
                              page_table=((rows, per_row), jnp.int32), active=((rows,), jnp.bool_)))
    limits = rows_of(mesh, dict(max_new=((rows,), jnp.int32), stop_ids=((rows, 8), jnp.int32)))
    scalars = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    check_program(decode, (abstract.params, pool, *args.values(), *draws.values(), *limits.values(), settings,
                           *scalars), platform, mesh, "generation decode loop (paged)", steps=16, pad_id=0)