"""The Baichuan order as one job on the embedded default (about 10 minutes on 2 CPU cores):

    python -m alignment.launch --config=configs/pipeline.py --workdir=/tmp/pipe

1. pas: a shortened configs/pas.py run trains a PAS model (the tiny model: its complements are fluent-looking
   fragments, not a real LLM's instructions).
2. base: a short general SFT of the tiny model from random init on one-step problems of both operations.
3. addition, subtraction: two category-specialised SFT runs from the base, each on its operation only; beside
   its problems as given, each trains on the same problems with the PAS model's complement appended to the prompt
   (workdir/<specialist>/augmented/), so a specialist answers with or without PAS in front.
4. merge: Model Stock of the two specialists over the base.
5. rm: a reward model initialised from the merge (its trunk; the value head starts at zero) on generated
   preference pairs (a worked solution vs the same steps with a wrong final answer).
6. grpo: GRPO from the merge with the verifiable math reward plus the reward model at weight
   `reward_model_weight` (the paper combines them), and the top-K KL to the merge. Rewards are scaled by the batch's
   standard deviation, not each group's: in a group whose math rewards agree, group scaling would blow the reward
   model's small differences up to unit advantages. (On this task the reward model only re-learns what the math
   reward checks exactly, so it adds no accuracy: benchmarks/RESULTS.md, "Pipeline".)
7. eval: every model above (base, both specialists, merge, GRPO) on the same 128 held-out one-step problems of both
   operations (configs/eval.py's arithmetic block, scored per operation).

Every SFT demonstration states an off-by-one final answer 30% of the time (answer_noise), mistakes that SFT
imitates and the verifiable reward corrects. Not configs/grpo.py's 60%: there the most common final answer in the
data is the wrong one, so the better an SFT model fits its data the lower its greedy accuracy, and the base,
specialist and merge rows would not compare. The report (pipeline_report.md,
pipeline_report.png in the workdir) has one row per step: its checkpoint, wall time, accuracy overall and per
operation, and the step's own key numbers. Each step runs into workdir/<step>; a finished step (its summary.json
exists) is reused, so a restart resumes at the interrupted step, and that step from its own checkpoints.
"""
import ml_collections

from alignment_configs import eval as eval_config
from alignment_configs import grpo, merge, pas, rm, sft

NOISE = 0.3  # share of SFT demonstrations whose final answer is off by one


def arithmetic_sft(steps: int, ops: str, category: str) -> ml_collections.ConfigDict:
    """configs/sft.py on one-step problems of `ops`, `steps` long, with a checkpoint every 50 steps to resume from."""
    c = sft.get_config()
    c.steps = steps
    c.eval_every = steps
    c.checkpoint.every = 50
    c.data.num_embedded_eval = 128
    c.data.train = ml_collections.ConfigDict({category: sft.source("embedded", ops=ops, num_ops=1,
                                                                   answer_noise=NOISE)})
    c.data.eval = ml_collections.ConfigDict({category: sft.source("embedded", ops=ops, num_ops=1,
                                                                  answer_noise=NOISE)})
    return c


def get_config():
    c = ml_collections.ConfigDict()
    c.stage = "pipeline"
    c.augment = "pas"  # pas: run the PAS step and give the specialists PAS-augmented prompts too | none: no PAS
    c.reward_model_weight = 0.1  # GRPO reward = math + this x the reward model's score; 0 = the math reward alone

    c.pas = pas.get_config()  # shortened: a smaller prompt pool and a shorter PAS-model SFT
    c.pas.data.num_embedded = 200
    c.pas.selection.options.finetune_steps = 10
    c.pas.sft.steps = 80
    c.pas.sft.eval_every = 80
    c.pas.sft.checkpoint.every = 50

    c.base = arithmetic_sft(300, "+-", "math")  # the general SFT: both operations, from random init
    c.specialists = ml_collections.ConfigDict(dict(  # name -> SFT run from the base; merged in this order
        addition=arithmetic_sft(100, "+", "addition"),
        subtraction=arithmetic_sft(100, "-", "subtraction"),
    ))
    for specialist in c.specialists.values():
        specialist.optimizer.lr = 1e-3  # continued training: a lower peak than from random init
        specialist.optimizer.warmup_steps = 10

    c.merge = merge.get_config()  # models, base and output are set by the pipeline
    c.merge.merge.method = "model_stock"

    c.rm = rm.get_config()  # init_from is set to the merge by the pipeline
    c.rm.steps = 60
    c.rm.eval_every = 60
    c.rm.checkpoint.every = 30

    c.grpo = grpo.get_config()  # init_from is set to the merge by the pipeline
    c.grpo.warm_start = ml_collections.ConfigDict()  # the merge is the starting point
    c.grpo.steps = 40
    c.grpo.rl.scale_rewards = "batch"

    c.eval = eval_config.get_config()  # checkpoints are set by the pipeline
    c.eval.arithmetic.by_operation = True  # accuracy per operation besides the overall one
    return c
