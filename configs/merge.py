"""Model merging (the paper merges the best checkpoint per domain with Model Stock before RL).

    python -m alignment.launch --config=configs/merge.py --workdir=/tmp/merge   # the offline demo
    python -m alignment.launch --config=configs/merge.py --workdir=/tmp/merge \
        --config.merge.models="('/ckpt/math', '/ckpt/code', '/ckpt/chat')" --config.merge.base=/ckpt/sft
    python -m alignment.launch --config=configs/merge.py --workdir=/tmp/merge --config.mergekit_yaml=merge.yml
"""
import ml_collections
from ml_collections.config_dict import placeholder

from alignment.config import model_preset


def get_config():
    c = ml_collections.ConfigDict()
    c.stage = "merge"
    c.seed = 0  # DARE masks (with each tensor's name and layer) and the demo checkpoints
    c.model = model_preset("tiny")  # architecture of the demo, and HF tensor names for Orbax -> HF output
    c.init_from = ""  # read by --dry_run's model summary; a HF directory here makes it describe that model
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))  # mesh the demo reloads onto
    c.sharding_rules = ml_collections.ConfigDict()  # logical axis -> mesh axes overrides of DEFAULT_RULES
    c.mergekit_yaml = ""  # a mergekit YAML merge config: its method, models, base and parameters replace merge.*'s
    c.merge = ml_collections.ConfigDict(dict(
        method="model_stock",  # linear | task_arithmetic | ties | dare_linear | dare_ties | slerp | model_stock
        models=(),  # checkpoints to merge: Orbax (root or step directory), HF safetensors directories or LoRA runs
        # (read as their base + adapters; the base must be merge.base, which defaults to it); () (and no
        # mergekit_yaml) merges an offline demo: a random tiny base + three perturbed copies built in workdir/demo
        base="",  # the model task vectors are taken from; required by all but linear and slerp
        output="",  # Orbax checkpoint written (step 0, loadable as init_from); '' = workdir/merged
        hf_output="",  # also write HF safetensors here ('' = no)
        hf_model_type="llama",  # config.json model_type for HF output made from Orbax inputs: llama | qwen2
        overwrite=False,  # replace existing outputs (only once the new ones are complete); else they are an error
        workers=0,  # merge threads; 0 = one per CPU
        memory_budget_gb=1.0,  # bytes of tensors in flight across workers; a larger single tensor runs alone
        shard_min_elements=1 << 24,  # with several local devices, merge tensors this large sharded; 0 = never
        params=ml_collections.ConfigDict(dict(  # a number, or a list of anchors interpolated over layer depth
            weights=(),  # one per model (number or anchors); () = 1.0 each
            density=1.0,  # ties / dare_*: fraction of task-vector entries kept (ties: max(1, int(density * n)))
            densities=(),  # ties / dare_*: one density per model (number or anchors); () = density for each
            lam=1.0,  # scale of the combined task vector
            t=0.5,  # slerp: 0 = first model, 1 = second
            normalize=placeholder(bool),  # divide by the (agreeing) weights' sum; None = method default (linear,
            # ties True; task_arithmetic, dare_linear, dare_ties False: mergekit's defaults)
            rescale=placeholder(str),  # ties / dare_*: 'none', 'inverse' (x 1/density) or 'l1' (restore each task
            # vector's L1 norm, mergekit's rescale: true); None = method default (ties 'none', dare_* 'l1')
            election="sum",  # ties / dare_ties sign election: 'sum' of values or 'count' of signs
            clamp_cosine=False,  # model_stock: clip the mean cosine to [0, 1] (t in [0, 1]); False = mergekit's t
        )),
        overrides=(),  # ((regex on tensor names like 'layers/q_proj', dict(field=value)), ...); first match wins
    ))
    return c
