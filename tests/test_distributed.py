import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_maml.distributed import end_process_group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    end_process_group()
    results[rank] = dist.is_initialized()


def test_end_process_group_destroys_the_group_on_every_rank():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        assert dict(results) == {0: False, 1: False}


def test_end_process_group_without_a_group_does_nothing():
    end_process_group()
    assert not dist.is_initialized()
