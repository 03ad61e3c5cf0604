"""Data-parallel training (what torchrun launches): 2 CPU processes with gloo keep identical replicas and
train on the same episode stream as one process."""

from __future__ import annotations

import csv
import os
import socket

import torch
import torch.multiprocessing as mp

from lite_train.train import train
from tests.lite_train.tiny_runs import tiny_config


def _worker(rank: int, world: int, port: int, data: str, out: str, snapshots: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    seen = []

    def snapshot(task, stats):  # after every round, this replica's trainable parameters
        seen.append({n: p.detach().clone() for n, p in model_ref[0].named_parameters() if p.requires_grad})

    model_ref = []
    import lite_train.train.run_state as loop

    build = loop.build_model

    def build_and_keep(cfg):
        model_ref.append(build(cfg))
        return model_ref[0]

    loop.build_model = build_and_keep
    try:
        train(tiny_config(data, out, iterations=8, tasks_per_step=4, threads=1), progress=False, on_task=snapshot)
        torch.save(seen, f"{snapshots}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def test_two_gloo_processes_keep_identical_replicas_and_match_one_process(tiny_data, tmp_path):
    out, snaps = tmp_path / "ddp", tmp_path / "snaps"
    snaps.mkdir()
    mp.start_processes(_worker, args=(2, _free_port(), str(tiny_data), str(out), str(snaps)), nprocs=2,
                       start_method="spawn", join=True)
    ranks = [torch.load(snaps / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 8 tasks = 4 rounds of 2
    for a, b in zip(*ranks):
        assert all(torch.equal(a[k], b[k]) for k in a)  # the replicas agree bit for bit after every round

    single = tmp_path / "single"
    # one thread, as in the workers: the thread count changes the rounding of convolutions
    train(tiny_config(tiny_data, single, iterations=8, tasks_per_step=4, threads=1), progress=False)
    ddp_rows, single_rows = _rows(out / "metrics.csv"), _rows(single / "metrics.csv")
    # the same global tasks (index, source, sizes) in the same order ...
    assert [r[:5] for r in ddp_rows] == [r[:5] for r in single_rows]
    # ... with bit-identical losses before the first Adam step (same parameters, same task generators) ...
    assert ddp_rows[:4] == single_rows[:4]
    # ... and after it, parameters that differ only through the order of the gradient sum across processes
    # (Adam moves each parameter by at most ~lr per step, whatever the rounding of a tiny gradient)
    final = torch.load(single / "fully_trained.pt", weights_only=True)
    for name, value in ranks[0][-1].items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=2 * 2e-3)


def _pretrain_worker(rank: int, world: int, port: int, data: str, out: str, snapshots: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    import lite_train.train.pretraining as pretraining
    from tests.lite_train.tiny_runs import tiny_pretrain_config

    models, seen = [], []
    net = pretraining.PretrainNet

    class Kept(net):  # the replica of this process, to compare its weights after every step
        def __init__(self, classes):
            super().__init__(classes)
            models.append(self)

    pretraining.PretrainNet = Kept
    try:
        pretraining.pretrain(tiny_pretrain_config(data, out, epochs=1), progress=False,
                             on_batch=lambda b, loss: seen.append({n: p.detach().clone()
                                                                   for n, p in models[0].named_parameters()}))
        torch.save(seen, f"{snapshots}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_pretraining_on_two_gloo_processes_keeps_identical_replicas(tiny_data, tmp_path):
    out, snaps = tmp_path / "pre", tmp_path / "snaps"
    snaps.mkdir()
    mp.start_processes(_pretrain_worker, args=(2, _free_port(), str(tiny_data), str(out), str(snaps)), nprocs=2,
                       start_method="spawn", join=True)
    ranks = [torch.load(snaps / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 4 batches of 8, 4 rows per process each
    for a, b in zip(*ranks):
        assert all(torch.equal(a[k], b[k]) for k in a)  # summed gradients, the same step everywhere
    assert (out / "backbone.pt").is_file() and len(_rows(out / "metrics.csv")) == 4  # rank 0 wrote the run
