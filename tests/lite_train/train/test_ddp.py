"""Data-parallel training (what torchrun launches): 2 CPU processes with gloo keep identical replicas and
train on the same episode stream as one process."""

from __future__ import annotations

import csv
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lite_train.train import train
from tests.lite_train.tiny_runs import tiny_config


def _train_replica(data: str, out: str) -> list[dict]:
    """This process's trainable parameters after every round of a 2-process training run."""
    import lite_train.train.run_state as run_state

    seen, models = [], []
    build = run_state.build_model

    def build_and_keep(cfg):
        models.append(build(cfg))
        return models[0]

    run_state.build_model = build_and_keep
    try:
        train(tiny_config(data, out, iterations=8, tasks_per_step=4, threads=1), progress=False,
              on_task=lambda task, stats: seen.append({n: p.detach().clone() for n, p in models[0].named_parameters()
                                                       if p.requires_grad}))
    finally:
        run_state.build_model = build
    return seen


def _pretrain_replica(data: str, out: str) -> list[dict]:
    """This process's weights after every step of a 2-process pretraining run."""
    import lite_train.train.pretraining as pretraining
    from tests.lite_train.tiny_runs import tiny_pretrain_config

    models, seen = [], []
    net = pretraining.PretrainNet

    class Kept(net):  # the replica of this process
        def __init__(self, classes):
            super().__init__(classes)
            models.append(self)

    pretraining.PretrainNet = Kept
    try:
        pretraining.pretrain(tiny_pretrain_config(data, out, epochs=1), progress=False,
                             on_batch=lambda b, loss: seen.append({n: p.detach().clone()
                                                                   for n, p in models[0].named_parameters()}))
    finally:
        pretraining.PretrainNet = net
    return seen


def _worker(rank: int, world: int, port: int, data: str, out: str, snapshots: str) -> None:
    """One torchrun-like process: a meta-training run, then a pretraining run (one start-up for both tests)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    try:
        torch.save({"train": _train_replica(data, f"{out}/train"), "pretrain": _pretrain_replica(data, f"{out}/pre")},
                   f"{snapshots}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


@pytest.fixture(scope="module")
def two_processes(tiny_data, tmp_path_factory):
    """Both runs on 2 gloo processes: (run folder root, [rank 0 snapshots, rank 1 snapshots])."""
    out, snaps = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("snaps")
    mp.start_processes(_worker, args=(2, _free_port(), str(tiny_data), str(out), str(snaps)), nprocs=2,
                       start_method="spawn", join=True)
    return out, [torch.load(snaps / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_gloo_processes_keep_identical_replicas_and_match_one_process(two_processes, tiny_data, tmp_path):
    out, ranks = two_processes
    ranks = [r["train"] for r in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 8 tasks = 4 rounds of 2
    for a, b in zip(*ranks):
        assert all(torch.equal(a[k], b[k]) for k in a)  # the replicas agree bit for bit after every round

    single = tmp_path / "single"
    # one thread, as in the workers: the thread count changes the rounding of convolutions
    train(tiny_config(tiny_data, single, iterations=8, tasks_per_step=4, threads=1), progress=False)
    ddp_rows, single_rows = _rows(out / "train" / "metrics.csv"), _rows(single / "metrics.csv")
    # the same global tasks (index, source, sizes) in the same order ...
    assert [r[:5] for r in ddp_rows] == [r[:5] for r in single_rows]
    # ... with bit-identical losses before the first Adam step (same parameters, same task generators) ...
    assert ddp_rows[:4] == single_rows[:4]
    # ... and after it, parameters that differ only through the order of the gradient sum across processes
    # (Adam moves each parameter by at most ~lr per step, whatever the rounding of a tiny gradient)
    final = torch.load(single / "fully_trained.pt", weights_only=True)
    for name, value in ranks[0][-1].items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=2 * 2e-3)


def test_pretraining_on_two_gloo_processes_keeps_identical_replicas(two_processes):
    out, ranks = two_processes
    ranks = [r["pretrain"] for r in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 4 batches of 8, 4 rows per process each
    for a, b in zip(*ranks):
        assert all(torch.equal(a[k], b[k]) for k in a)  # summed gradients, the same step everywhere
    assert (out / "pre" / "backbone.pt").is_file() and len(_rows(out / "pre" / "metrics.csv")) == 4  # rank 0's
