"""Benchmark: ``RunningNorm`` in an RL loop against gymnasium's ``NormalizeObservation``.

Run from the repository root::

    python benchmarks/rl_step.py            # full run
    python benchmarks/rl_step.py --quick    # a few seconds, for smoke tests

torch runs at its *default* thread count (what an RL script gets): on a tiny tensor a kernel that
wakes the intra-op pool costs far more than its arithmetic, and that is what users pay.

What is timed, per call, in interleaved blocks (median of blocks; ratio to gymnasium's median):

* **One observation per step** (1x4 from real CartPole-v1 rollouts, 1x64 synthetic): a
  ``RunningNorm(F)`` train-mode call (default ``nan_policy``) on a ``1xF`` float32 tensor, against
  the real ``gymnasium.wrappers.NormalizeObservation`` wrapper's ``observation(obs)`` method on the
  same observations. That method is exactly the work the wrapper adds to every ``env.step`` (its
  ``step`` is the inner env's ``step`` followed by ``observation``), so no env step has to be
  subtracted and the ratio is of the normalisers alone (the stricter comparison: a whole env step
  would dilute it). The 4-feature wrapper wraps a real ``CartPole-v1``; the 64-feature one a
  trivial env that replays recorded observations (no gymnasium env has 64 features and no
  download). Converting an observation to a tensor is not timed: the policy needs a tensor
  whichever normaliser runs. Target <= 1.5x.
* **Whole CartPole step**, for information: ``env.step`` + ``torch.from_numpy`` + ``RunningNorm``
  against ``NormalizeObservation(env).step`` (same seed and actions, resets included), and the
  bare ``env.step`` so the normalisers' share can be read off by subtraction.
* **A batch of 64 observations** (vectorised envs; 64x4 from CartPole rollouts, 64x64 synthetic):
  ``RunningNorm`` on the batch against the real ``gymnasium.wrappers.vector.NormalizeObservation``
  wrapper's ``observations(batch)`` (its vectorised ``RunningMeanStd.update`` and normalisation)
  on a 64-env ``SyncVectorEnv``. Target <= 1.5x.
* **Reference floor**: eight plain torch ops updating float64 state (count, mean, M2; a Chan merge
  of the batch's moments), and the same plus the six ops that normalise. No target: they show
  what any torch implementation pays in per-op dispatch on tiny tensors.

gymnasium 1.4's wrappers build their ``RunningMeanStd`` with the observation space's dtype, so they
keep float32 state for float32 observations (numpy arithmetic); the count is a Python float.

A check before timing feeds the same observations one at a time to a fresh ``RunningNorm`` and a
fresh wrapper and prints the largest difference of their outputs, so both sides do the same work.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers import NormalizeObservation
from gymnasium.wrappers.vector import NormalizeObservation as VectorNormalizeObservation

try:  # run as a script from a checkout without an installed package
    import statplug  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the script is launched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import interleaved, median_us, ratio_line

from statplug import RunningNorm

TARGET = 1.5
BATCH = 64
GYM_EPS = 1e-8  # NormalizeObservation's default epsilon; RunningNorm's default eps is the same


class ReplayEnv(gym.Env):
    """A trivial env whose observations are a recorded float32 array, replayed in a cycle."""

    def __init__(self, observations: np.ndarray) -> None:
        self._obs = observations
        self._i = 0
        f = observations.shape[1]
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (f,), np.float32)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: Any = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._i = 0
        return self._obs[0], {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._i = (self._i + 1) % len(self._obs)
        return self._obs[self._i], 0.0, False, False, {}


def cartpole_observations(n: int, seed: int) -> np.ndarray:
    """``n`` observations of CartPole-v1 under seeded random actions, resets included."""
    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    out = [obs]
    while len(out) < n:
        obs, _, term, trunc, _ = env.step(int(rng.integers(2)))
        if term or trunc:
            obs, _ = env.reset()
        out.append(obs)
    return np.stack(out).astype(np.float32)


def synthetic_observations(n: int, f: int, seed: int) -> np.ndarray:
    """``n`` float32 observations of ``f`` features with assorted means and scales."""
    rng = np.random.default_rng(seed)
    loc = rng.uniform(-5, 5, f)
    scale = rng.uniform(0.1, 3, f)
    return (rng.standard_normal((n, f)) * scale + loc).astype(np.float32)


def observations(n: int, f: int, seed: int) -> np.ndarray:
    return cartpole_observations(n, seed) if f == 4 else synthetic_observations(n, f, seed)


def single_env(obs: np.ndarray) -> gym.Env:
    return gym.make("CartPole-v1") if obs.shape[1] == 4 else ReplayEnv(obs)


class PlainState:
    """float64 count, mean and M2 as plain tensors: the state of the reference floor."""

    def __init__(self, f: int) -> None:
        self.count = torch.zeros(1, dtype=torch.float64)
        self.mean = torch.zeros(1, f, dtype=torch.float64)
        self.m2 = torch.zeros(1, f, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Chan's merge of ``x``'s moments in eight plain torch ops; returns ``x`` in float64."""
        n = x.shape[0]
        xd = x.to(torch.float64)  # 1
        vb, mb = torch.var_mean(xd, 0, keepdim=True, correction=0)  # 2
        d = mb - self.mean  # 3
        self.count.add_(n)  # 4
        self.mean.addcdiv_(d, self.count, value=n)  # 5: mean += n * d / count
        e = mb - self.mean  # 6
        self.m2.addcmul_(d, e, value=n)  # 7: the cross term n_a * n_b / N * d**2
        self.m2.add_(vb, alpha=n)  # 8: the batch's own M2
        return xd

    def update_and_normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The eight update ops, then six more that normalise as RunningNorm does."""
        xd = self.update(x)
        return ((xd - self.mean) * torch.rsqrt(self.m2 / self.count + GYM_EPS)).to(x.dtype)


def check_same_work(obs: np.ndarray) -> str:
    """Feed ``obs`` one at a time to both normalisers; the largest output difference.

    gymnasium's ``RunningMeanStd`` starts from a pseudo-count of 1e-4 with mean 0 and variance
    1; that prior is shrunk to nothing here (for this check only) so both must agree from the
    second row on, up to float32 rounding.
    """
    wrapper = NormalizeObservation(single_env(obs), epsilon=GYM_EPS)
    wrapper.obs_rms.count = 1e-30
    norm = RunningNorm(obs.shape[1])
    worst = 0.0
    for i, row in enumerate(obs):
        ours = norm(torch.from_numpy(row).unsqueeze(0))[0].numpy()
        theirs = wrapper.observation(row)
        if i >= 1:  # RunningNorm is the identity before two samples
            worst = max(worst, float(np.max(np.abs(ours - theirs) / np.maximum(1, abs(theirs)))))
    flag = "ok" if worst < 1e-3 and int(norm.count) == len(obs) else "MISMATCH"
    return (
        f"check {obs.shape[1]} features, {len(obs)} single-row steps: count {int(norm.count)}, "
        f"max relative |RunningNorm - NormalizeObservation| {worst:.1e}  {flag}"
    )


def compare(case: str, baseline: str, gym_call: Any, inputs: np.ndarray, rounds: int,
            target_s: float) -> list[str]:
    """Time gymnasium's ``gym_call`` and RunningNorm on the same inputs, cycled in the same order.

    ``inputs`` holds one observation or one batch per call (``[calls, rows, features]``); the
    torch candidates get zero-copy tensor views of the same arrays.
    """
    f = inputs.shape[-1]
    as_tensors = [torch.from_numpy(a) for a in inputs]  # views, made before timing
    norm = RunningNorm(f)
    plain, plain_n = PlainState(f), PlainState(f)
    it_gym = itertools.cycle([a[0] for a in inputs] if inputs.shape[1] == 1 else list(inputs))
    it_ours, it_plain, it_plain_n = (itertools.cycle(as_tensors) for _ in range(3))
    fns = {
        "gym": lambda: gym_call(next(it_gym)),
        "ours": lambda: norm(next(it_ours)),
        "plain": lambda: plain.update(next(it_plain)),
        "plain_n": lambda: plain_n.update_and_normalise(next(it_plain_n)),
    }
    return report(case, interleaved(fns, rounds, target_s), baseline)


def single_rows(f: int, seed: int, rounds: int, target_s: float) -> list[str]:
    """One observation per call: RunningNorm (1xF) against the wrapper's ``observation(obs)``."""
    obs = observations(1024, f, seed)
    wrapper = NormalizeObservation(single_env(obs), epsilon=GYM_EPS)
    return compare(f"1x{f}", "NormalizeObservation", wrapper.observation, obs[:, None, :],
                   rounds, target_s)


def batch_rows(f: int, seed: int, rounds: int, target_s: float) -> list[str]:
    """A batch of 64 observations per call: RunningNorm against the vector wrapper."""
    obs = observations(BATCH * 32, f, seed)
    env = gym.vector.SyncVectorEnv([lambda: single_env(obs) for _ in range(BATCH)])
    wrapper = VectorNormalizeObservation(env, epsilon=GYM_EPS)
    rows = compare(f"{BATCH}x{f}", "vector NormalizeObservation", wrapper.observations,
                   obs.reshape(32, BATCH, f), rounds, target_s)
    env.close()
    return rows


def report(case: str, samples: dict[str, list[float]], baseline: str) -> list[str]:
    us = {name: median_us(s) for name, s in samples.items()}
    gym_us = us["gym"]
    return [
        f"{case}: {baseline} {gym_us:.1f} us, RunningNorm {us['ours']:.1f} us, "
        f"8-op floor {us['plain']:.1f} us, floor + normalise {us['plain_n']:.1f} us (medians)",
        ratio_line(f"RunningNorm {case} / {baseline}", us["ours"] / gym_us, TARGET),
        ratio_line(f"eight plain torch ops, float64 state, {case} / {baseline}",
                   us["plain"] / gym_us),
        ratio_line(f"eight ops + normalise {case} / {baseline}", us["plain_n"] / gym_us),
    ]


def cartpole_step_rows(seed: int, rounds: int, target_s: float) -> list[str]:
    """Whole env steps (for information): the normalisers' cost next to CartPole's own."""
    actions = itertools.cycle(np.random.default_rng(seed).integers(2, size=4096).tolist())
    bare, plain_env, wrapped = (gym.make("CartPole-v1") for _ in range(3))
    wrapped = NormalizeObservation(wrapped, epsilon=GYM_EPS)
    norm = RunningNorm(4)
    for env in (bare, plain_env, wrapped):
        env.reset(seed=seed)

    def step_env(env: gym.Env) -> np.ndarray:
        obs, _, term, trunc, _ = env.step(next(actions))
        if term or trunc:
            obs, _ = env.reset()
        return obs

    fns = {
        "bare": lambda: step_env(bare),
        "ours": lambda: norm(torch.from_numpy(step_env(plain_env)).unsqueeze(0)),
        "gym": lambda: step_env(wrapped),
    }
    us = {name: median_us(s) for name, s in interleaved(fns, rounds, target_s).items()}
    share = (us["ours"] - us["bare"]) / max(us["gym"] - us["bare"], 1e-9)
    return [
        f"CartPole-v1 whole step: env.step {us['bare']:.1f} us, + RunningNorm {us['ours']:.1f} "
        f"us, NormalizeObservation(env).step {us['gym']:.1f} us (medians)",
        ratio_line("whole CartPole step, env + RunningNorm / NormalizeObservation(env)",
                   us["ours"] / us["gym"]),
        ratio_line("RunningNorm / NormalizeObservation by subtracting env.step", share),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few short rounds, for smoke tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rounds, target_s = (5, 0.005) if args.quick else (31, 0.02)
    print(f"torch {torch.__version__}, gymnasium {gym.__version__}, torch threads "
          f"{torch.get_num_threads()} (torch's default), {'quick' if args.quick else 'full'} "
          f"run: median of {rounds} interleaved blocks of ~{target_s * 1e3:g} ms")
    print(check_same_work(observations(256, 4, args.seed)))
    print(check_same_work(observations(256, 64, args.seed)))
    for f in (4, 64):
        print("\n".join(single_rows(f, args.seed, rounds, target_s)))
    print("\n".join(cartpole_step_rows(args.seed, rounds, target_s)))
    for f in (4, 64):
        print("\n".join(batch_rows(f, args.seed, rounds, target_s)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
