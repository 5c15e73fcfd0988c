"""``group_device`` / ``has_cuda_backend``, and the collective guard the distributed tests use."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import CollectiveMisuse, guard_collectives, run_distributed

from statplug.distributed.group import group_device, has_cuda_backend


@pytest.mark.parametrize(
    ("backend", "cuda"),
    [
        ("nccl", True),
        ("NCCL", True),
        ("cpu:gloo,cuda:nccl", True),
        ("cuda:nccl", True),
        ("gloo", False),
        ("mpi", False),
        # init_process_group() without a backend: the defaults, NCCL among them where CUDA is.
        ("undefined", torch.cuda.is_available()),
    ],
)
def test_has_cuda_backend(backend: str, cuda: bool) -> None:
    assert has_cuda_backend(backend) is cuda


def _devices(rank: int, world: int) -> dict[str, str]:
    out = {"world": str(group_device())}
    out["gloo"] = str(group_device(dist.new_group(list(range(world)), backend="gloo")))
    return out


def test_group_device_of_gloo_groups_is_the_cpu() -> None:
    for res in run_distributed(_devices, 2):
        assert res == {"world": "cpu", "gloo": "cpu"}


def _undefined(rank: int, world: int) -> str:
    # init_process_group() without a backend reports "undefined" (torch 2.13), not "gloo".
    return f"{dist.get_backend()} {group_device()}"


def test_group_device_of_a_group_without_a_backend_name() -> None:
    for res in run_distributed(_undefined, 2, backend=None):
        backend, device = res.split()
        assert backend == "undefined"
        assert device == ("cuda:0" if torch.cuda.is_available() else "cpu"), res


def _misuses(rank: int, world: int) -> dict[str, str]:
    """Each mistake NCCL would catch fails under the guard, and the collective is not made (the
    peer skips it too, so nothing hangs)."""
    out = {}
    cases = {
        "meta": lambda: dist.all_reduce(torch.ones(2, device="meta")),
        "strided": lambda: dist.all_reduce(torch.ones(4, 4).t()),
        "gather_out": lambda: dist.all_gather([torch.ones(2).t(), torch.ones(4)[::2]],
                                              torch.ones(2)),
    }
    for name, call in cases.items():
        try:
            call()
        except CollectiveMisuse as err:
            out[name] = str(err)
    ok = torch.ones(3)
    dist.all_reduce(ok)  # a well-formed collective still runs, for real
    out["ok"] = str(ok.tolist())
    return out


def test_the_guard_fails_collectives_nccl_would_refuse() -> None:
    for res in run_distributed(_misuses, 2):
        assert "on meta, expected group_device(group) = cpu" in res["meta"]
        assert "non-contiguous" in res["strided"] and "non-contiguous" in res["gather_out"]
        assert res["ok"] == "[2.0, 2.0, 2.0]"


def test_the_guard_fails_a_collective_inside_callback_setup() -> None:
    from lightning.pytorch.callbacks import Callback

    class Early(Callback):
        def setup(self, trainer: object, pl_module: object, stage: str) -> None:
            dist.all_reduce(torch.ones(1))

    # The check comes before the collective, so no process group is needed to see it fail.
    with guard_collectives(), pytest.raises(CollectiveMisuse, match=r"Early\.setup"):
        Early().setup(None, None, "fit")


def _off_device(rank: int, world: int) -> dict[str, str]:
    from statplug import RunningMoments, StatplugError
    from statplug.distributed.group import require_group_device

    out = {}
    stats = [RunningMoments(2), RunningMoments(2, device="meta")]
    stats[1].stat_name = "encoder.norm"
    try:
        require_group_device(stats, None, "SyncStats")
    except StatplugError as err:
        out["error"] = str(err)
    require_group_device(stats[:1], None, "SyncStats")  # on the group's device: fine
    return out


def test_a_stat_off_the_groups_device_is_named_before_any_collective() -> None:
    for res in run_distributed(_off_device, 2):
        message = res["error"]
        assert message.startswith("SyncStats: stat `encoder.norm` is on meta")
        assert "collectives run on cpu" in message and ".to('cpu')" in message
