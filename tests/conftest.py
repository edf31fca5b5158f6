"""Every test process simulates 8 CPU devices, so multi-device meshes run on a laptop or CI box."""
import os
import pathlib
import signal

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# model.dtype 'auto' (the shipped configs') computes in float32 in tests on every machine, so a test's numerics do
# not depend on whether the CPU has bf16 instructions; tests/models/test_compute_dtype.py covers the detection.
os.environ.setdefault("ALIGNMENT_AUTO_DTYPE", "float32")

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data():
    """Path to ../shared/data; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def space_share(sample, params):
    """A reward the tiny random model can learn in a few steps: the share of spaces in the completion. With
    params["preempt_at"] = k, the k-th call sends this process SIGTERM (what a TPU preemption notice does)."""
    text = sample.completion
    if params.get("preempt_at") and space_share.calls == params["preempt_at"]:
        os.kill(os.getpid(), signal.SIGTERM)
    space_share.calls += 1
    return sum(c == " " for c in text) / max(len(text), 1)


@pytest.fixture
def space_share_reward():
    """The 'space_share' reward registered for the test (its call counter reset); yields the function."""
    from alignment.rewards import registry

    registry.REWARDS["space_share"], registry.PARAMS["space_share"] = space_share, {"preempt_at": 0}
    space_share.calls = 0
    yield space_share
    del registry.REWARDS["space_share"], registry.PARAMS["space_share"]
