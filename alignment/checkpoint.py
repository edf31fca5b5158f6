"""Orbax checkpoints of the full train state plus the data-iterator position.

Layout: `<directory>/<step>/state` holds the TrainState pytree (params, optimizer state, step, rng) and
`<directory>/<step>/data` the iterator state as JSON. Restores are driven by an abstract target carrying
the wanted shardings, so a checkpoint written on one mesh loads onto any other mesh shape. Before any
tensor is read, the checkpoint's metadata is checked against the target and every mismatch is reported
at once, instead of orbax failing (or silently casting) on the first one.

Beside the steps, `<directory>/model.json` says what the weights are (written and read by
`alignment.data.model_info`): the model config, the tokenizer, the chat template and the stage that wrote them.

A step whose files are missing, truncated or unreadable is corrupt, never a mismatch: resuming skips it
with a warning, restores the newest readable step and moves the corrupt ones aside (renamed
`<step>.corrupt-<time>`, kept for inspection) so the resumed run writes those steps anew.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

STATE = "state"
DATA = "data"
# Step directories are named by their step alone ("<directory>/120"); a renamed `120.corrupt-...` is no step.
STEP_NAMES = ocp.step.standard_name_format()
MODEL_INFO = "model.json"


def _log(message: str, *args: Any) -> None:
    """Log on process 0 only, so multi-host runs print each event once."""
    if jax.process_index() == 0:
        logger.info(message, *args)


def _key_name(key: Any) -> str:
    """One path component as a string: orbax metadata uses dict keys where the live tree has attributes."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat(tree: Any) -> dict[str, Any]:
    """{'params/embed': leaf, ...} for every leaf, with paths comparable between live trees and metadata."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _describe(leaf: Any) -> str:
    return f"{tuple(leaf.shape)} {np.dtype(leaf.dtype).name}"


class IncompatibleCheckpoint(ValueError):
    """The checkpoint is complete but holds a different model (names, shapes or dtypes)."""


class CorruptCheckpoint(ValueError):
    """A checkpoint step whose files are missing, truncated or unreadable."""


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def _state_metadata(step_dir: epath.Path) -> Any:
    """The stored state's tree of shapes and dtypes; CorruptCheckpoint when it cannot be read.

    Read through the handler, not `CheckpointManager.item_metadata`, which turns a missing or unreadable
    file into None and so into an apparent mismatch of every tensor.
    """
    try:
        return ocp.StandardCheckpointHandler().metadata(step_dir / STATE)
    except Exception as e:  # noqa: BLE001 - whatever the reason, the step cannot describe its tensors
        raise CorruptCheckpoint(f"checkpoint {step_dir} is corrupt: its state metadata cannot be read "
                                f"({_first_line(e)})") from None


def _is_restore_leftover(unraisable) -> bool:
    """Whether an unraisable exception comes from the reads a failed Orbax restore left behind.

    Orbax reads a step's arrays concurrently on an event loop that it closes as soon as one read fails. The
    reads still in flight then end one by one, at any time up to interpreter exit: TensorStore callbacks into
    the closed loop ('Event loop is closed'), and unfinished read coroutines closed by the garbage collector,
    which Orbax turns into new errors. Python prints each as a trace: dozens around the one warning that counts.
    """
    error, source = unraisable.exc_value, unraisable.object
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    code = getattr(source, "cr_code", None)  # a coroutine's code object
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


class _DropUnretrievedReads(logging.Filter):
    """Drops asyncio's 'Future exception was never retrieved' reports for reads of a step that failed to restore.

    The third form of the leftovers above: a failed read whose future nobody awaited any more, reported by
    asyncio (at error level) when the garbage collector frees it. Only reports naming a failed step pass here.
    """

    def __init__(self):
        super().__init__()
        self.failed_steps: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Future exception was never retrieved"):
            return True
        return not any(step_dir in message for step_dir in self.failed_steps)


_UNRETRIEVED_READS = _DropUnretrievedReads()


def _drop_restore_leftovers() -> None:
    """Route unraisable exceptions through `_is_restore_leftover` for the rest of the process (the leftovers
    come at any time); every other one still reaches the previous hook."""
    asyncio_logger = logging.getLogger("asyncio")
    if _UNRETRIEVED_READS not in asyncio_logger.filters:
        asyncio_logger.addFilter(_UNRETRIEVED_READS)
    previous = sys.unraisablehook
    if getattr(previous, "drops_restore_leftovers", False):
        return

    def hook(unraisable) -> None:
        if not _is_restore_leftover(unraisable):
            previous(unraisable)

    hook.drops_restore_leftovers = True
    sys.unraisablehook = hook


def check_compatible(expected: Any, found: Any, where: str) -> None:
    """Raise one ValueError listing every tensor missing, unexpected or differently shaped/typed in `found`.

    `expected` is the abstract target, `found` the checkpoint's metadata tree (same paths after flattening).
    """
    want, have = _flat(expected), _flat(found)
    problems = []
    for path in sorted(want.keys() | have.keys()):
        if path not in have:
            problems.append(f"  {path}: expected {_describe(want[path])}, missing from checkpoint")
        elif path not in want:
            problems.append(f"  {path}: not expected, checkpoint has {_describe(have[path])}")
        elif (tuple(want[path].shape) != tuple(have[path].shape)
              or np.dtype(want[path].dtype) != np.dtype(have[path].dtype)):
            problems.append(f"  {path}: expected {_describe(want[path])}, found {_describe(have[path])}")
    if problems:
        raise IncompatibleCheckpoint(f"checkpoint {where} does not match the model ({len(problems)} tensors differ); "
                         "nothing was loaded:\n" + "\n".join(problems))


def _targets(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the shardings to restore onto; this is what makes restores mesh-agnostic."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _has_frozen(node: Any) -> bool:
    """A LoRA train state (or its shardings): its `frozen` base is not checkpointed."""
    return getattr(node, "frozen", None) is not None


def _without_frozen(tree: Any) -> Any:
    return jax.tree.map(lambda n: n.replace(frozen=None) if _has_frozen(n) else n, tree, is_leaf=_has_frozen)


class Checkpointer:
    """Saves and restores TrainState + data-iterator state under one directory, keeping the last `max_to_keep`."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, save_interval_steps: int = 1,
                 async_save: bool = True):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                               enable_async_checkpointing=async_save, step_name_format=STEP_NAMES)
        # Handlers are registered up front so metadata can be read before the first save or restore.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, data_state: dict | None = None, force: bool = False) -> bool:
        """Save `state` (and `data_state`) at `step`; False when the save interval skipped it."""
        state = _without_frozen(state)  # a LoRA run's base is its init_from; only the adapters are saved
        # None is stored as JSON null so every checkpoint has both items and restores need no probing.
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state)})
        saved = self._manager.save(step, args=args, force=force)
        if saved:
            _log("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, abstract_state: Any, shardings: Any, step: int | None = None) -> tuple[Any, dict | None]:
        """(state laid out by `shardings`, data_state or None) from `step`.

        Without `step`, the newest complete checkpoint: a newer one left half-written (e.g. by a crash during
        a save) or otherwise corrupt is skipped with a warning and moved aside, so the run writes it anew.
        """
        if any(map(_has_frozen, jax.tree.leaves(abstract_state, is_leaf=_has_frozen))):
            # LoRA: the adapters are read; the base (loaded) is the one the abstract state carries.
            state, data_state = self.restore(_without_frozen(abstract_state), _without_frozen(shardings), step)
            attach = lambda given, restored: restored.replace(frozen=given.frozen) if _has_frozen(given) else restored
            return jax.tree.map(attach, abstract_state, state, is_leaf=lambda n: hasattr(n, "frozen")), data_state
        _drop_restore_leftovers()
        if step is not None:
            restored = self._restore_step(self._resolve_step(step), abstract_state, shardings)
            _log("checkpoint: restored step %d from %s", step, self.directory)
            return restored
        self._resolve_step(None)  # raises when there is none at all
        corrupt = []
        for candidate in sorted(self._manager.all_steps(), reverse=True):
            restored, problem = self._try_restore(candidate, abstract_state, shardings)
            if problem is None:
                _log("checkpoint: restored step %d from %s", candidate, self.directory)
                if corrupt:
                    self._move_aside(corrupt)
                return restored
            logger.warning("checkpoint step %d in %s is incomplete or unreadable (%s); trying the previous one",
                           candidate, self.directory, problem)
            corrupt.append(candidate)
        raise FileNotFoundError(f"no complete checkpoint in {self.directory}: steps {sorted(corrupt)} are all "
                                "incomplete or corrupt (reasons in the warnings above); move them away to start afresh")

    def _try_restore(self, step: int, abstract_state: Any, shardings: Any) -> tuple[Any, str | None]:
        """(restored, None), or (None, why `step` is unusable): unreadable here or on any other process.

        Processes read different shards, so damage can show on some only, and those must never resume from an
        older step than the rest. The all-gather gives every process the same verdict; when the failed ones
        already missed the barrier that ends Orbax's restore, it fails the job instead (a prompt gloo error on
        CPU, where without it the job hung until the coordinator gave up).
        """
        try:
            restored, problem = self._restore_step(step, abstract_state, shardings), None
        except IncompatibleCheckpoint:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means this checkpoint is unusable
            restored, problem = None, _first_line(e)
            _UNRETRIEVED_READS.failed_steps.add(f"{ocp.step.find_step_path(self.directory, STEP_NAMES, step=step)}{os.sep}")
        if jax.process_count() > 1 and not multihost_utils.process_allgather(np.array(problem is None)).all():
            restored, problem = None, problem or "unreadable on another process"
        return restored, problem

    def _restore_step(self, step: int, abstract_state: Any, shardings: Any) -> tuple[Any, dict | None]:
        step_dir = ocp.step.find_step_path(self.directory, STEP_NAMES, step=step)
        check_compatible(abstract_state, _state_metadata(step_dir), f"{self.directory} step {step}")
        args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(_targets(abstract_state, shardings)),
                                     DATA: ocp.args.JsonRestore()})
        restored = self._manager.restore(step, args=args)
        return restored[STATE], restored[DATA]

    def _move_aside(self, steps: list[int]) -> None:
        """Rename corrupt step directories to `<step>.corrupt-<time>`, which Orbax does not take for steps.

        Orbax skips a save at or below its latest step, so a corrupt step left in place would never be
        rewritten and every later start would fall back again.
        """
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if jax.process_index() == 0:
            for step in steps:
                path = ocp.step.find_step_path(self.directory, STEP_NAMES, step=step)
                target = path.parent / f"{path.name}.corrupt-{stamp}"
                path.rename(target)
                logger.warning("checkpoint: moved corrupt step %d aside to %s; the resumed run writes it anew",
                               step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoint: corrupt steps moved aside")
        self._manager.reload()

    def _resolve_step(self, step: int | None) -> int:
        """The requested step, or the latest; a missing checkpoint is a FileNotFoundError naming the directory."""
        steps = self._manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        if step is None:
            return max(steps)
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available: {sorted(steps)}")
        return step

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _locate(path: epath.Path) -> tuple[epath.Path, int]:
    """(checkpoint root, step) for either a step directory or a root (its latest step)."""
    if (path / STATE).is_dir():
        return path.parent, ocp.step.step_from_checkpoint_name(path.name)
    steps = ocp.step.checkpoint_steps(path) if path.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {path}")
    return path, max(steps)


def load_params(path: str | os.PathLike, abstract_params: Any, shardings: Any) -> Any:
    """Only the params of a checkpoint (step directory, or root for its latest step), laid out by `shardings`.

    Used to start a policy from an SFT checkpoint and by the merge stage; optimizer state is never read.
    """
    root, step = _locate(epath.Path(path))
    if (root / "lora.json").exists() and "lora" not in abstract_params:
        raise ValueError(f"{root} holds LoRA adapters, not a whole model (lora.json names their base): write the "
                         "merged model with alignment.train.adapters.merge_lora(run, output) and use that")
    # PyTree (not Standard) handler: the on-disk format is the same, and it supports partial restore.
    handlers = {STATE: ocp.PyTreeCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()}
    stored = _state_metadata(ocp.step.find_step_path(root, STEP_NAMES, step=step))
    # A PPO run's state holds {"policy", "critic"}: its model is the policy.
    prefix = ("policy",) if "params" not in stored and "params" in stored.get("policy", {}) else ()
    for key in prefix:
        stored = stored[key]
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False,
                                           step_name_format=STEP_NAMES)
    with ocp.CheckpointManager(root, options=options, item_handlers=handlers) as manager:
        check_compatible({"params": abstract_params}, {"params": stored.get("params")}, f"{root} step {step}")
        target = {"params": _targets(abstract_params, shardings)}
        for key in reversed(prefix):
            target = {key: target}
        restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                         partial_restore=True)
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE: restore}))[STATE]
    _log("checkpoint: loaded params of step %d from %s", step, root)
    for key in prefix:
        restored = restored[key]
    return restored["params"]


def checkpoint_directory(path: str) -> str:
    """A run's workdir -> its checkpoints directory; a checkpoints, step or HF directory as given."""
    inner = os.path.join(path, "checkpoints")
    return inner if os.path.isdir(inner) else path


def write_model_info(directory: str, info: dict) -> None:
    """`directory`/model.json: what the checkpoints in `directory` hold (see `alignment.data.model_info`)."""
    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MODEL_INFO)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=2)
    os.replace(path + ".tmp", path)


def read_model_info(path: str) -> tuple[dict, str] | None:
    """(model.json's content, the directory holding it) for a checkpoint directory given as its root or one of its
    step directories; None where there is none (HF directories, runs from before model.json existed)."""
    for directory in (path, os.path.dirname(os.path.normpath(path))):
        file = os.path.join(directory, MODEL_INFO)
        if os.path.isfile(file):
            try:
                with open(file) as f:
                    return json.load(f), directory
            except (OSError, ValueError) as e:
                raise ValueError(f"{file}: unreadable ({e})") from None
    return None
