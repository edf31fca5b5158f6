"""Multi-turn rollouts: the policy calls tools, an environment answers, generation continues.

Each episode runs on the engine's continuous batch as a chain of sequences: the engine generates the policy's
turn until its end-of-turn token; the turn's tool calls (`alignment.data.tools.parse_tool_calls`) go to the
episode's environment (`alignment.rl.env`); their results, in the chat template's layout followed by the next
turn's header (`chat.encode_tool_results`), are appended and the episode is submitted again, sharing the batch
with every other episode. An episode ends with a turn that calls nothing (its final answer), after
`env.max_turns` policy turns, when an environment says done, or when its tokens after the prompt reach the
budget `rl.max_new_tokens`. A malformed call is answered with an error observation naming the problem.

The rollout's completion of a row is everything after the prompt; `TurnCompletions.model_mask` marks the tokens
the policy generated, the only ones in the loss (tool results are context). Rewards score the final answer
(`Sample.completion`; "" when the episode ended on a call) with the record given the whole trajectory
(`record["trajectory"]`, chat messages), plus the environment's per-turn rewards (component `env`). GRPO's
group advantages then compare whole trajectories. Episode statistics travel as reward components named
`episode_*` (not in the total): `episode_called` (made a well-formed call), `episode_malformed` (wrote a
malformed one), `episode_tool_errors`, `episode_turns`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from alignment.config import one_of, positive
from alignment.data.chat import encode_tool_results
from alignment.data.prompts import prompt_messages
from alignment.data.tools import parse_tool_calls
from alignment.generation.engine import Completions
from alignment.generation.sampling import SamplingParams
from alignment.rewards.registry import Sample
from alignment.rl.env import ENVIRONMENTS, Environment, StepResult, make_env
from alignment.rl.rollouts import Rollouts

FIELDS = {
    "env.name": one_of("", *ENVIRONMENTS),
    "env.max_turns": positive(),
}
TURN_SEED_STRIDE = 1_000_003  # turn t of an episode samples with seed + t * stride


@dataclasses.dataclass(frozen=True)
class TurnCompletions(Completions):
    """Completions of multi-turn episodes: a row's tokens are everything after its prompt (policy turns and tool
    results). model_mask [R, max_new] bool: True on the tokens the policy generated; logprobs are 0 elsewhere."""

    model_mask: np.ndarray


def model_mask(out: Completions, width: int) -> np.ndarray:
    """[R, width] bool: which completion tokens the policy generated (all of them for single-turn completions)."""
    if not isinstance(out, TurnCompletions):
        return np.ones((len(out.lengths), width), bool)
    mask = np.zeros((len(out.lengths), width), bool)
    n = min(width, out.model_mask.shape[1])
    mask[:, :n] = out.model_mask[:, :n]
    return mask


@dataclasses.dataclass
class Episode:
    """One trajectory in progress: the tokens after its prompt and what they are."""

    record: dict
    env: Environment
    prompt: list[int]
    seed: int
    sample: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    mask: list[bool] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    sampling_logprobs: list[float] = dataclasses.field(default_factory=list)
    messages: list[dict] = dataclasses.field(default_factory=list)  # the conversation after the prompt
    final: str = ""  # the last turn's text when it called nothing
    stopped: bool = False  # the last policy turn ended with its end-of-turn token
    turns: int = 0
    calls: int = 0
    malformed: int = 0
    tool_errors: int = 0
    env_reward: float = 0.0
    request: object = None

    def append(self, ids, model: bool, logprobs=None, sampling_logprobs=None) -> None:
        self.tokens += list(ids)
        self.mask += [model] * len(ids)
        self.logprobs += list(logprobs) if model else [0.0] * len(ids)
        self.sampling_logprobs += list(sampling_logprobs) if model else [0.0] * len(ids)


class ToolRollouts(Rollouts):
    """`Rollouts` whose samples are multi-turn episodes against `config.env.name` environments."""

    def __init__(self, config, tokenizer, engine, rewards):
        super().__init__(config, tokenizer, engine, rewards)
        self.env_name, self.max_turns = config.env.name, config.env.max_turns
        self.tools = make_env(self.env_name).tools if config.env.definitions_in_prompt else None
        self.template = config.chat_template
        parse_tool_calls(self.template, "")  # a template without a tool format fails here, before any rollout

    def sample(self, records: list[dict], num_samples: int, sampling: SamplingParams, seed: int, params=None):
        """(prompt ids, TurnCompletions, rewards) of `num_samples` episodes per record."""
        prompts = self.prompt_ids(records)
        episodes = []
        for i, (record, prompt) in enumerate(zip(records, prompts)):
            for g in range(num_samples):
                env = make_env(self.env_name)
                env.reset(record)
                episodes.append(Episode(record, env, prompt, seed + i, g))
        self.run(episodes, sampling, params)
        out = self.completions(episodes, num_samples, sampling.truncated)
        samples = [Sample(prompt_id=str(e.record.get("prompt_id", k // num_samples)), prompt=prompt_messages(e.record),
                          completion=e.final, record=dict(e.record, trajectory=e.messages))
                   for k, e in enumerate(episodes)]
        rewards = self.rewards(samples)
        env_reward = np.asarray([e.env_reward for e in episodes], np.float32)
        stats = {"env": env_reward,
                 "episode_called": np.asarray([e.calls > 0 for e in episodes], np.float32),
                 "episode_malformed": np.asarray([e.malformed > 0 for e in episodes], np.float32),
                 "episode_tool_errors": np.asarray([e.tool_errors for e in episodes], np.float32),
                 "episode_turns": np.asarray([e.turns for e in episodes], np.float32)}
        rewards = dataclasses.replace(rewards, total=rewards.total + env_reward,
                                      components={**rewards.components, **stats})
        return prompts, out, rewards

    def run(self, episodes: list[Episode], sampling: SamplingParams, params) -> None:
        """Steps the engine until every episode has ended, answering tool calls as turns finish."""
        budget = self.config.rl.max_new_tokens

        def submit(e: Episode) -> None:  # the episode so far is the prompt of its next turn
            e.request = self.engine.submit(e.prompt + e.tokens, budget - len(e.tokens), sampling,
                                           seed=e.seed + TURN_SEED_STRIDE * e.turns, sample=e.sample)

        for episode in episodes:
            submit(episode)
        active = list(episodes)
        while active:
            self.engine.step(params)
            waiting = []
            for episode in active:
                if not episode.request.finished:
                    waiting.append(episode)
                elif self.take_turn(episode, budget):
                    submit(episode)
                    waiting.append(episode)
            active = waiting

    def take_turn(self, episode: Episode, budget: int) -> bool:
        """Records the policy's finished turn and answers its calls; True when the episode goes on."""
        request = episode.request
        episode.append(request.generated, True, request.logprobs, request.sampling_logprobs)
        episode.turns += 1
        episode.stopped = request.stopped
        body = request.generated[:-1] if request.stopped else request.generated
        parsed = parse_tool_calls(self.template, self.tokenizer.decode(body, skip_special=True))
        episode.calls += len(parsed.calls)
        episode.malformed += len(parsed.errors)
        episode.messages.append({"role": "assistant", "content": parsed.content,
                                 "tool_calls": [c.message_entry() for c in parsed.calls]})
        if not (parsed.calls or parsed.errors):
            episode.final = parsed.content
            return False
        if not request.stopped or episode.turns >= self.max_turns:
            return False
        results = [episode.env.step(c) for c in parsed.calls]
        results += [StepResult(f"error: malformed tool call: {e}") for e in parsed.errors]
        episode.tool_errors += sum(r.observation.startswith("error:") for r in results)
        episode.env_reward += sum(r.reward for r in results)
        episode.messages += [{"role": "tool", "content": r.observation} for r in results]
        observation = encode_tool_results(self.tokenizer, self.template, [r.observation for r in results])
        if any(r.done for r in results) or len(episode.tokens) + len(observation) >= budget:
            return False
        episode.append(observation, False)
        return True

    def completions(self, episodes: list[Episode], num_samples: int, truncated: bool) -> TurnCompletions:
        rows, width = len(episodes), self.config.rl.max_new_tokens
        tokens = np.full((rows, width), self.engine.pad_id, np.int32)
        logprobs, sampling_logprobs = np.zeros((rows, width), np.float32), np.zeros((rows, width), np.float32)
        mask = np.zeros((rows, width), bool)
        for r, e in enumerate(episodes):
            n = len(e.tokens)
            tokens[r, :n], mask[r, :n] = e.tokens, e.mask
            logprobs[r, :n], sampling_logprobs[r, :n] = e.logprobs, e.sampling_logprobs
        return TurnCompletions(tokens=tokens, lengths=np.asarray([len(e.tokens) for e in episodes], np.int32),
                               logprobs=logprobs, sampling_logprobs=sampling_logprobs,
                               stopped=np.asarray([e.stopped for e in episodes], bool), truncated=truncated,
                               num_samples=num_samples, model_mask=mask)


def make_rollouts(config, tokenizer, engine, rewards) -> Rollouts:
    """Multi-turn tool rollouts when the config names an environment (`env.name`), else single-turn ones."""
    env = config.get("env")
    cls = ToolRollouts if env is not None and env.name else Rollouts
    return cls(config, tokenizer, engine, rewards)
