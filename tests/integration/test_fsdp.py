"""FSDP2 (`fully_shard`): two CPU processes with gloo give the same loss and gradients as one
process, with W4A16 fake quant on every Linear."""

from __future__ import annotations

import os

import pytest
import torch

import aqn_rs

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 96), torch.nn.GELU(),
        torch.nn.Linear(96, 16),
    )


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 64, generator=g), torch.randn(8, 16, generator=g)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _worker(rank: int, world: int, store: str, out_dir: str, fmt: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # A file rendezvous: no TCP port to pick (picking a free one and closing it before the
    # ranks bind it is a race).
    torch.distributed.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    try:
        # A CPU mesh, named: fully_shard's default mesh is the GPU's where one is visible, and
        # the model and its inputs here live on the CPU.
        mesh = init_device_mesh("cpu", (world,))
        model = _model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        q = aqn_rs.Nvfp4Quantizer() if fmt == "nvfp4" else aqn_rs.Mxfp4Quantizer()
        h = aqn_rs.quantize_model(model, q, exclude=())
        x, y = _batch()
        half = x.shape[0] // world
        xs, ys = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        loss = _loss(model, xs, ys)
        loss.backward()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"loss": total / world, "grads": grads, "n": len(h.modules)}, os.path.join(out_dir, "fsdp.pt"))
        torch.distributed.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        torch.distributed.destroy_process_group()
    # The device mesh cache keeps the group alive into interpreter teardown, where gloo's
    # threads can abort the process (seen under load); the result is saved, so skip it.
    os._exit(0)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fsdp2_two_processes_match_one(tmp_path, fmt):
    store = str(tmp_path / "rendezvous")
    torch.multiprocessing.spawn(_worker, args=(2, store, str(tmp_path), fmt), nprocs=2, join=True)
    got = torch.load(tmp_path / "fsdp.pt")
    assert got["n"] == 3

    model = _model()
    q = aqn_rs.Nvfp4Quantizer() if fmt == "nvfp4" else aqn_rs.Mxfp4Quantizer()
    aqn_rs.quantize_model(model, q, exclude=())
    x, y = _batch()
    loss = _loss(model, x, y)
    loss.backward()
    # Same math, different reduction order (two half-batch means averaged): f32 rounding only.
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-6, atol=1e-7)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
