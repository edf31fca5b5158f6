"""Evaluate checkpoints and write a report (results.json, summary.md, charts/) to the workdir.

    python -m alignment.launch --config=configs/eval.py --workdir=/tmp/eval --config.endpoint=http://127.0.0.1:8000/v1
    python -m alignment.launch --config=configs/eval.py --workdir=/tmp/eval \
        --config.checkpoints=sft=http://127.0.0.1:8000/v1,grpo=/ckpt/grpo --config.benchmarks=gsm8k,ifeval \
        --config.data.gsm8k=/data/gsm8k/test.jsonl

With no flags it evaluates the embedded model (random tiny weights) on the embedded arithmetic task, offline. The
arithmetic defaults are the main job's held-out prompts, decoded as its RL evaluation decodes them, so

    python -m alignment.launch --config=configs/eval.py --workdir=/tmp/eval \
        --config.checkpoints=warm=/tmp/grpo/warm_start,grpo=/tmp/grpo

reproduces the accuracies `configs/grpo.py --workdir=/tmp/grpo` logged before and after RL. IFEval's
prompts ship with the package; every other benchmark reads a file given as --config.data.<name>, and naming one
without it fails before anything runs, saying where to get the file and the fields it must hold.
"""
import ml_collections

from alignment.config import base_config, model_preset


def get_config():
    c = base_config()
    c.stage = "eval"
    c.model = model_preset("tiny")  # architecture for checkpoints run by the local engine
    c.endpoint = ""  # OpenAI-compatible API root serving the model, e.g. http://127.0.0.1:8000/v1
    c.model_name = "default"  # the checkpoint's name in the report, and the `model` sent to `endpoint`
    c.checkpoints = ""  # 'name=target,...' to compare; target: an API root URL, a run or checkpoint dir, 'embedded'
    # (none of checkpoints, endpoint, init_from: the embedded model, config.model at random init)
    c.benchmarks = "arithmetic"  # comma-separated: arithmetic gsm8k math humaneval ifeval cfbench sysbench fbbench ux
    # Benchmark data files; '' = the copy shipped with the package (ifeval only), else the benchmark needs a path.
    c.data = ml_collections.ConfigDict(dict(
        gsm8k="",  # GSM8K test split, JSONL {question, answer ending '#### N'} (openai/grade-school-math)
        math="",  # JSONL {problem, answer | solution, type?}, e.g. MATH-500
        humaneval="",  # JSONL {task_id, prompt, test, entry_point} (openai/human-eval, gunzipped)
        ifeval="",  # JSONL {key, prompt, instruction_id_list, kwargs}; '' = the 541 prompts in alignment/eval/data
        cfbench="",  # JSON list {idx, prompt, criteria [[text, 主需|次需, ..]]} (PKU-Baichuan-MLSystemLab/CFBench)
        sysbench="",  # JSONL sessions, see alignment/eval/benchmarks.py
        fbbench="",  # JSONL weighted checklists, see alignment/eval/benchmarks.py
        ux="",  # JSONL {id, messages, criteria, category}: the user-experience pass rate
    ))
    c.limit = 0  # samples per benchmark; 0 = all
    c.arithmetic = ml_collections.ConfigDict(dict(  # the embedded task; defaults = configs/grpo.py's held-out prompts
        num_problems=128,  # problems generated (grpo: data.num_embedded_eval)
        seed=1000,  # generator seed (grpo: config.seed + 1000)
        max_operand=9,  # operands are 1..max_operand
        num_ops=1,  # operations per problem (grpo: data.eval.math.embedded.num_ops)
        ops="+-",  # operations drawn from
        answer_format="The answer is {}.",  # how worked solutions end (the reward reads the number after it)
        by_operation=False,  # per-operation categories (addition, subtraction, mixed) instead of one 'math' category
        max_tokens=32,  # new tokens per response (grpo: rl.max_new_tokens)
    ))
    c.num_samples = 1  # responses per HumanEval problem; pass@k needs num_samples >= k
    c.pass_k = "1"  # comma-separated k for HumanEval pass@k
    c.generation = ml_collections.ConfigDict(dict(
        temperature=0.0,  # 0 = greedy; use > 0 with num_samples > 1
        max_tokens=1024,  # new tokens per response
        workers=8,  # concurrent requests to an endpoint
        chunk=128,  # prompts per generate call, each cached before the next (the grpo evaluation: 128 in one)
        timeout=300.0,  # seconds per endpoint request
    ))
    c.pas = ml_collections.ConfigDict(dict(
        target="",  # PAS model: a pas run's pas_model directory or an API root; '' = prompts go in unchanged
        model="default",  # `model` sent to a PAS endpoint
        max_tokens=64,  # length of the complementary instruction
    ))
    c.judge = ml_collections.ConfigDict(dict(
        endpoint="",  # API root of the judge for cfbench/sysbench/fbbench/ux; any OpenAI-compatible server
        model="default",  # `model` sent to the judge
        temperature=0.0,  # judges answer deterministically
        max_tokens=512,  # room for one line per checklist item
        attempts=3,  # asks per sample until the answer parses; then all items score 0 and are counted
        workers=8,  # concurrent judge requests
    ))
    c.sandbox = ml_collections.ConfigDict(dict(
        cpu_seconds=5.0,  # CPU time per HumanEval program
        wall_seconds=10.0,  # wall-clock time per program
        memory_mb=1024,  # address-space limit per program
        workers=4,  # programs run at once
    ))
    return c
