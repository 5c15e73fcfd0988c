"""statplug.interop against gymnasium (the real library): its NormalizeObservation and
RunningMeanStd to and from RunningNorm, and statplug's NormalizeObservation wrapper."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from dist_utils import run_distributed

from statplug import RunningNorm, sync_stats
from statplug.distributed.sync import named_stats
from statplug.errors import CheckpointMismatchError, MissingExtraError
from statplug.interop import from_gymnasium, to_gymnasium

gym = pytest.importorskip("gymnasium")
from gymnasium.wrappers.utils import RunningMeanStd  # noqa: E402

from statplug.interop import NormalizeObservation  # noqa: E402

# One float32 ulp at 1 (absolute, for outputs near 0) or 1e-6 relative. Outputs are compared on
# float64 observations: both sides then normalise the same numbers with the same statistics.
TOL = {"rtol": 1e-6, "atol": float(np.finfo(np.float32).eps)}


def run(env: object, steps: int, seed: int = 0) -> list[np.ndarray]:
    """Reset with ``seed`` and take ``steps`` seeded random actions (resetting at episode ends);
    the observations the env returned, reset ones included."""
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)  # type: ignore[attr-defined]
    out = [obs]
    for _ in range(steps):
        obs, _, terminated, truncated, _ = env.step(int(rng.integers(2)))  # type: ignore[attr-defined]
        out.append(obs)
        if terminated or truncated:
            obs, _ = env.reset()  # type: ignore[attr-defined]
            out.append(obs)
    return out


class Recorder(gym.ObservationWrapper):  # type: ignore[misc]
    """Keeps every raw observation the env returns."""

    def __init__(self, env: object) -> None:
        super().__init__(env)
        self.seen: list[np.ndarray] = []

    def observation(self, observation: np.ndarray) -> np.ndarray:
        self.seen.append(np.array(observation, dtype=np.float64))
        return observation


def trained_gymnasium(steps: int = 500) -> object:
    env = gym.wrappers.NormalizeObservation(gym.make("CartPole-v1"))
    run(env, steps)
    return env


def probe(rms: object, n: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(3)
    mean, var = np.asarray(rms.mean, np.float64), np.asarray(rms.var, np.float64)  # type: ignore[attr-defined]
    return mean + rng.normal(size=(n, mean.size)) * np.sqrt(var) * 2


def gym_normalised(env: object, x: np.ndarray) -> np.ndarray:
    """gymnasium's formula with its statistics, without updating them."""
    rms = env.obs_rms  # type: ignore[attr-defined]
    return np.float32((x - rms.mean) / np.sqrt(rms.var + env.epsilon))  # type: ignore[attr-defined]


def ours(norm: RunningNorm, x: np.ndarray) -> np.ndarray:
    return norm.eval()(torch.from_numpy(x)).numpy().astype(np.float32)


# ---------------------------------------------------------------------- import and export
def test_from_gymnasium_wrapper_gives_its_outputs_and_count() -> None:
    env = trained_gymnasium()
    n = env.obs_rms.count  # type: ignore[attr-defined]
    norm = from_gymnasium(env)
    assert norm.count.dtype == torch.int64 and norm.count.item() == round(n)
    assert n != round(n)  # gymnasium's prior of 1e-4: rounded, documented
    assert norm.eps == 1e-8 and norm.clip is None
    x = probe(env.obs_rms)  # type: ignore[attr-defined]
    np.testing.assert_allclose(ours(norm, x), gym_normalised(env, x), **TOL)


def test_from_running_mean_std_and_eps() -> None:
    rms = RunningMeanStd(shape=(3,))
    rng = np.random.default_rng(0)
    for _ in range(10):
        rms.update(rng.normal(size=(100, 3)) * [1, 10, 0.1] + [5, -5, 0])
    norm = from_gymnasium(rms, eps=1e-3)
    assert norm.count.item() == 1000 and norm.eps == 1e-3
    x = probe(rms)
    ref = np.float32((x - rms.mean) / np.sqrt(rms.var + 1e-3))
    np.testing.assert_allclose(ours(norm, x), ref, **TOL)


def test_fresh_gymnasium_gives_an_empty_normaliser() -> None:
    norm = from_gymnasium(gym.wrappers.NormalizeObservation(gym.make("CartPole-v1")))
    assert norm.count.item() == 0
    assert norm.mean.abs().sum().item() == 0 and norm.var.abs().sum().item() == 0


def test_round_trip_through_gymnasium() -> None:
    source = trained_gymnasium()
    norm = from_gymnasium(source)
    target = gym.wrappers.NormalizeObservation(gym.make("CartPole-v1"), epsilon=0.1)
    to_gymnasium(norm, target)
    assert target.epsilon == 1e-8
    assert target.obs_rms.mean.dtype == np.float32  # the target's dtype is kept
    assert target.obs_rms.count == norm.count.item()
    x = probe(source.obs_rms)  # type: ignore[attr-defined]
    np.testing.assert_allclose(gym_normalised(target, x), gym_normalised(source, x), **TOL)
    assert from_gymnasium(target).count.item() == norm.count.item()


def test_statplug_normaliser_into_running_mean_std() -> None:
    norm = RunningNorm(2)
    norm.update(torch.randn(4321, 2, dtype=torch.float64) * 3 + 1)
    rms = RunningMeanStd(shape=(2,))
    to_gymnasium(norm, rms)
    assert rms.count == 4321 and rms.mean.dtype == np.float64
    np.testing.assert_array_equal(rms.mean, norm.mean.numpy())
    np.testing.assert_allclose(rms.var, norm.var.numpy(), rtol=1e-15)
    back = from_gymnasium(rms)
    assert back.count.item() == 4321
    torch.testing.assert_close(back.var, norm.var, rtol=1e-15, atol=0)
    # gymnasium keeps learning from there, as from its own state.
    rms.update(np.zeros((9, 2)))
    assert rms.count == 4330


def test_vector_normalize_observation_both_ways() -> None:
    envs = gym.wrappers.vector.NormalizeObservation(gym.make_vec("CartPole-v1", num_envs=4))
    envs.reset(seed=0)
    for _ in range(50):
        envs.step(envs.action_space.sample())
    norm = from_gymnasium(envs)
    assert norm.count.item() == 4 * 51 and norm.moments.shape == (4,)
    x = probe(envs.obs_rms)
    np.testing.assert_allclose(ours(norm, x), gym_normalised(envs, x), **TOL)
    target = gym.wrappers.vector.NormalizeObservation(gym.make_vec("CartPole-v1", num_envs=2))
    to_gymnasium(norm, target)
    np.testing.assert_allclose(gym_normalised(target, x), gym_normalised(envs, x), **TOL)


def test_wrapper_with_float32_statistics() -> None:
    wrapper = NormalizeObservation(gym.make("CartPole-v1"), accumulator_dtype=torch.float32)
    out = run(wrapper, 200)
    assert wrapper.norm.mean.dtype == torch.float32
    assert all(o.dtype == np.float32 for o in out)


def test_to_gymnasium_refuses_what_gymnasium_cannot_express() -> None:
    target = gym.wrappers.NormalizeObservation(gym.make("CartPole-v1"))
    with pytest.raises(ValueError, match="eps_on='var' and clip=None"):
        to_gymnasium(RunningNorm(4, clip=5.0), target)
    with pytest.raises(ValueError, match="eps_on='var' and clip=None"):
        to_gymnasium(RunningNorm(4, eps_on="std"), target)
    with pytest.raises(ValueError, match="epsilon > 0"):
        to_gymnasium(RunningNorm(4, eps=0.0), target)
    with pytest.raises(ValueError, match=r"shape \(3,\) does not match"):
        to_gymnasium(RunningNorm(3), target)
    with pytest.raises(ValueError, match="expected gymnasium's NormalizeObservation"):
        from_gymnasium(object())
    # A clipping normaliser may still give its statistics to a RunningMeanStd.
    to_gymnasium(RunningNorm(4, clip=5.0), target.obs_rms)


def test_missing_gymnasium_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    with pytest.raises(MissingExtraError, match=r"gymnasium.*statplug\[gymnasium\]"):
        from_gymnasium(object())


def test_importing_interop_loads_no_rl_library() -> None:
    code = (
        "import sys, statplug.interop\n"
        "loaded = {'gymnasium', 'stable_baselines3', 'rsl_rl'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- the wrapper
def test_wrapper_matches_gymnasium_on_cartpole() -> None:
    reference = gym.wrappers.NormalizeObservation(gym.make("CartPole-v1"))
    wrapper = NormalizeObservation(gym.make("CartPole-v1"), gymnasium_prior=True)
    assert wrapper.observation_space == reference.observation_space
    theirs, mine = run(reference, 2000), run(wrapper, 2000)
    assert len(theirs) == len(mine) > 2000
    assert all(o.dtype == np.float32 and o.shape == (4,) for o in mine)
    # gymnasium keeps float32 statistics (its observation space's dtype), whose rounding drifts
    # by up to ~1e-6 relative over 2,000 steps (measured 0.7e-6 to 1.2e-6 over seeds 0-4);
    # statplug's are float64.
    np.testing.assert_allclose(np.array(mine[10:]), np.array(theirs[10:]), rtol=1e-6, atol=1e-6)
    assert wrapper.norm.count.item() == len(mine) == round(reference.obs_rms.count)
    # With float64 statistics, gymnasium's own algorithm gives the wrapper's outputs from the
    # first step on (measured: bit for bit).
    reference64 = gym.wrappers.NormalizeObservation(gym.make("CartPole-v1"))
    reference64.obs_rms = RunningMeanStd(shape=(4,), dtype=np.float64)
    np.testing.assert_allclose(np.array(mine), np.array(run(reference64, 2000)), **TOL)


def test_wrapper_without_prior_counts_each_observation_once() -> None:
    recorder = Recorder(gym.make("CartPole-v1"))
    wrapper = NormalizeObservation(recorder)
    out = run(wrapper, 300)
    seen = np.array(recorder.seen)
    assert wrapper.norm.count.item() == len(seen) == len(out)
    np.testing.assert_array_equal(out[0], seen[0].astype(np.float32))  # one sample: unchanged
    for t in (1, 2, 50, len(seen) - 1):  # float64 reference of every observation so far
        past = seen[: t + 1]
        ref = (seen[t] - past.mean(0)) / np.sqrt(past.var(0) + 1e-8)
        np.testing.assert_allclose(out[t], ref.astype(np.float32), **TOL)
    # In train mode the norm's forward updates it: still once per observation.
    for prior in (False, True):
        wrapper = NormalizeObservation(gym.make("CartPole-v1"), gymnasium_prior=prior)
        wrapper.norm.train()
        assert wrapper.norm.count.item() == 0
        assert len(run(wrapper, 40)) == wrapper.norm.count.item()


def test_update_running_mean_freezes_and_is_saved() -> None:
    wrapper = NormalizeObservation(gym.make("CartPole-v1"))
    run(wrapper, 50)
    n = wrapper.norm.count.item()
    wrapper.update_running_mean = False
    assert not wrapper.update_running_mean and wrapper.norm.frozen
    run(wrapper, 20, seed=1)
    assert wrapper.norm.count.item() == n
    state = wrapper.state_dict()
    assert bool(state["moments.frozen_flag"])
    wrapper.update_running_mean = True
    run(wrapper, 20, seed=2)
    assert wrapper.norm.count.item() > n


def test_wrapper_state_dict_round_trip() -> None:
    wrapper = NormalizeObservation(gym.make("CartPole-v1"))
    run(wrapper, 200)
    buf = io.BytesIO()
    torch.save(wrapper.state_dict(), buf)
    buf.seek(0)
    fresh = NormalizeObservation(gym.make("CartPole-v1"))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.norm.count.item() == wrapper.norm.count.item()
    fresh.update_running_mean = wrapper.update_running_mean = False
    x = np.array([0.1, -0.2, 0.03, 0.4], dtype=np.float32)
    np.testing.assert_array_equal(fresh.observation(x), wrapper.observation(x))
    with pytest.raises(CheckpointMismatchError):
        fresh.load_state_dict({**wrapper.state_dict(), "moments.count": torch.tensor(-1)})
    assert fresh.norm.count.item() == wrapper.norm.count.item()  # unchanged


def test_wrapper_exposes_its_stat_and_pickles_by_reference() -> None:
    wrapper = NormalizeObservation(gym.make("CartPole-v1"))
    assert [s for _, s in named_stats(wrapper)] == [wrapper.norm.moments]
    assert sync_stats(wrapper).n_collectives == 0  # no process group: a no-op
    assert pickle.loads(pickle.dumps(NormalizeObservation)) is NormalizeObservation
    assert isinstance(wrapper, gym.ObservationWrapper)


def test_wrapper_scalar_observations_and_bad_space() -> None:
    env = gym.make("CartPole-v1")
    env.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(), dtype=np.float64)
    wrapper = NormalizeObservation(env)
    assert wrapper.norm.moments.shape == (1,)
    out = [wrapper.observation(np.float64(v)) for v in (1.0, 3.0, 5.0)]
    assert out[-1].shape == () and out[-1].dtype == np.float32
    assert out[-1] == pytest.approx(2 / np.sqrt(8 / 3), rel=1e-6)
    bad = gym.make("CartPole-v1")
    bad.observation_space = gym.spaces.Discrete(3)  # shape () is fine; a Dict has none
    NormalizeObservation(bad)
    bad.observation_space = gym.spaces.Dict({"a": gym.spaces.Discrete(3)})
    with pytest.raises(ValueError, match="must have a shape"):
        NormalizeObservation(bad)


# ---------------------------------------------------------------------- two ranks
def _sync_body(rank: int, world_size: int) -> dict[str, object]:
    import gymnasium

    from statplug import sync_stats
    from statplug.interop import NormalizeObservation

    recorder = Recorder(gymnasium.make("CartPole-v1"))
    wrapper = NormalizeObservation(recorder)
    run(wrapper, 300 + 137 * rank, seed=rank)  # uneven counts
    report = sync_stats(wrapper)
    after_first = {k: v.clone() for k, v in wrapper.state_dict().items()}
    sync_stats(wrapper)  # idempotent
    return {
        "seen": np.array(recorder.seen),
        "state": {k: v.numpy() for k, v in wrapper.state_dict().items()},
        "first": {k: v.numpy() for k, v in after_first.items()},
        "n_stats": report.n_stats,
    }


@pytest.mark.slow
def test_two_ranks_sync_wrappers_exactly() -> None:
    results = run_distributed(_sync_body, 2)
    seen = np.concatenate([r["seen"] for r in results])  # float64 reference of both ranks
    for r in results:
        assert r["n_stats"] == 1
        state = r["state"]
        assert state["moments.count"] == len(seen)
        np.testing.assert_allclose(state["moments.mean"], seen.mean(0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(state["moments.m2"] / len(seen), seen.var(0), rtol=1e-12)
        for key, value in state.items():  # a second sync changes nothing
            np.testing.assert_array_equal(value, r["first"][key])
    for key, value in results[0]["state"].items():  # ranks agree bit for bit
        np.testing.assert_array_equal(value, results[1]["state"][key])
