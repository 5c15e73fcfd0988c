"""statplug.interop against stable-baselines3's VecNormalize (the real library)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from statplug import RunningNorm
from statplug.errors import MissingExtraError
from statplug.interop import from_sb3, to_sb3

pytest.importorskip("stable_baselines3")
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

# One float32 ulp at 1 (absolute, for outputs near 0) or 1e-6 relative.
TOL = {"rtol": 1e-6, "atol": float(np.finfo(np.float32).eps)}


def trained_vec_normalize(steps: int = 300, seed: int = 0) -> VecNormalize:
    venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=4, seed=seed), clip_obs=5.0)
    venv.reset()
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        venv.step(rng.integers(0, 2, size=4))
    return venv


def observations(venv: VecNormalize, n: int = 1000, seed: int = 1) -> np.ndarray:
    """``n`` raw observations around the statistics (some beyond the clip)."""
    rng = np.random.default_rng(seed)
    std = np.sqrt(venv.obs_rms.var)
    return (venv.obs_rms.mean + rng.normal(size=(n, 4)) * std * 2).astype(np.float32)


def ours(norm: RunningNorm, x: np.ndarray) -> np.ndarray:
    return norm.eval()(torch.from_numpy(x.astype(np.float64))).numpy().astype(np.float32)


def test_from_sb3_gives_vec_normalize_outputs_and_count() -> None:
    venv = trained_vec_normalize()
    norm = from_sb3(venv)
    assert norm.count.dtype == torch.int64
    assert norm.count.item() == 4 * 301  # reset + 300 steps of 4 envs; the 1e-4 prior rounded
    assert venv.obs_rms.count == pytest.approx(4 * 301 + 1e-4, abs=1e-9)
    assert norm.clip == 5.0 and norm.eps == venv.epsilon
    x = observations(venv)
    ref = venv.normalize_obs(x)
    assert np.abs(ref).max() == 5.0  # the clip is exercised
    np.testing.assert_allclose(ours(norm, x), ref, **TOL)


def test_round_trip_through_sb3_keeps_outputs_and_count() -> None:
    source = trained_vec_normalize()
    norm = from_sb3(source)
    target = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=5))
    to_sb3(norm, target)
    assert target.clip_obs == 5.0 and target.epsilon == norm.eps
    assert target.obs_rms.count == norm.count.item()
    x = observations(source)
    np.testing.assert_allclose(target.normalize_obs(x), source.normalize_obs(x), **TOL)
    back = from_sb3(target)
    assert back.count.item() == norm.count.item()
    torch.testing.assert_close(back.mean, norm.mean, rtol=0, atol=0)
    torch.testing.assert_close(back.var, norm.var, rtol=1e-15, atol=0)


def test_statplug_normaliser_into_sb3_and_back_is_exact() -> None:
    norm = RunningNorm(4, clip=3.0)
    data = torch.randn(12_345, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.1, 5.0]) + 3
    norm.update(data)
    venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=1, seed=0))
    to_sb3(norm, venv)
    x = data[:1000].numpy().astype(np.float32)
    np.testing.assert_allclose(venv.normalize_obs(x), ours(norm, x), **TOL)
    back = from_sb3(venv)
    assert back.count.item() == 12_345 and back.clip == 3.0


def test_returns_normaliser() -> None:
    venv = trained_vec_normalize()
    norm = from_sb3(venv, which="ret")
    assert norm.moments.shape == (1,)
    assert norm.count.item() == round(venv.ret_rms.count)
    assert norm.clip == venv.clip_reward
    np.testing.assert_allclose(norm.mean.numpy(), [venv.ret_rms.mean], rtol=0, atol=0)
    np.testing.assert_allclose(norm.var.numpy(), [venv.ret_rms.var], rtol=1e-15)
    # SB3 scales rewards without centring them.
    rewards = np.linspace(-50, 50, 1000)
    ref = venv.normalize_reward(rewards)
    scaled = (torch.from_numpy(rewards) / (norm.var + norm.eps).sqrt()).clamp(-10, 10)
    np.testing.assert_allclose(scaled.numpy(), ref, **TOL)
    target = VecNormalize(make_vec_env("CartPole-v1", n_envs=1, seed=0))
    to_sb3(norm, target, which="ret")
    assert target.ret_rms.count == norm.count.item()
    np.testing.assert_allclose(target.normalize_reward(rewards), ref, **TOL)


def test_empty_normaliser_writes_sb3_fresh_state() -> None:
    venv = trained_vec_normalize(steps=3)
    to_sb3(RunningNorm(4), venv)
    assert venv.obs_rms.count == 1e-4
    np.testing.assert_array_equal(venv.obs_rms.mean, np.zeros(4))
    np.testing.assert_array_equal(venv.obs_rms.var, np.ones(4))
    assert venv.clip_obs == float("inf")
    assert from_sb3(venv).count.item() == 0


def test_misuse_names_the_argument() -> None:
    venv = trained_vec_normalize(steps=1)
    with pytest.raises(ValueError, match="`which` must be 'obs' or 'ret'"):
        from_sb3(venv, which="reward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a stable_baselines3 VecNormalize"):
        from_sb3(object())
    with pytest.raises(ValueError, match="`key` is for dict observations only"):
        from_sb3(venv, key="image")
    with pytest.raises(ValueError, match="eps_on='var'"):
        to_sb3(RunningNorm(4, eps_on="std"), venv)
    with pytest.raises(ValueError, match=r"shape \(3,\) does not match"):
        to_sb3(RunningNorm(3), venv)


def test_missing_sb3_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "stable_baselines3", None)
    with pytest.raises(MissingExtraError, match=r"stable-baselines3.*statplug\[sb3\]"):
        from_sb3(object())
