"""Multi-turn GRPO with a tool on the embedded default: 5-digit addition and subtraction, which the tiny model cannot
do in its head but can do by calling a calculator (`alignment.rl.env`). An SFT warm start on demonstrations
that call the calculator only 40% of the time (the rest state the right answer directly, which the model can only
guess), then GRPO over whole episodes: the policy writes a call, the environment answers, the policy answers; only
the policy's tokens are trained. Prints held-out accuracy before and after RL; curve.jsonl also holds the share
of held-out episodes with a well-formed call (episode_called/tools).

    python -m alignment.launch --config=configs/grpo_tools.py --workdir=/tmp/grpo_tools
"""
import ml_collections

from alignment_configs import grpo, sft


def get_config():
    c = grpo.get_config()
    c.steps = 40
    c.optimizer.lr = 1e-3  # one token (the call's opening) decides an episode; at 1e-4, 30 steps left it unmoved
    c.checkpoint.every = 10
    c.env = ml_collections.ConfigDict(dict(
        name="calculator",  # calculator | python: the environment answering the policy's tool calls
        max_turns=3,  # policy turns per episode at most (each but the last may call tools)
        # The Qwen-style tool preamble alone is ~400 tokens of the tiny model's 1024-piece vocabulary (its context is
        # 512): the calls are learned from the warm start's demonstrations instead of read from definitions.
        definitions_in_prompt=False,
    ))
    c.rl.prompts_per_step = 8
    c.rl.num_samples = 8
    c.rl.max_prompt_length = 32
    c.rl.max_new_tokens = 160  # every token after the prompt: calls, tool results and the answer
    c.rl.eval_every = 10
    task = dict(digits=5, ops="+-")
    c.data.train = ml_collections.ConfigDict(dict(tools=sft.source("embedded_tools", tool_share=0.0, **task)))
    c.data.eval = ml_collections.ConfigDict(dict(tools=sft.source("embedded_tools", tool_share=0.0, **task)))
    c.warm_start.steps = 2000  # copying numbers into a call and out of its result takes the tiny model ~1000 steps
    c.warm_start.data.max_length = 160
    c.warm_start.data.train = ml_collections.ConfigDict(dict(
        tools=sft.source("embedded_tools", tool_share=0.4, **task)))
    c.warm_start.data.eval = ml_collections.ConfigDict(dict(
        tools=sft.source("embedded_tools", tool_share=0.4, **task)))
    return c
