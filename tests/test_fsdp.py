"""FSDP2 on the CPU: accelerate turns FSDP into DDP without GPUs, so this drives torch's `fully_shard` directly over
gloo, as accelerate does on GPUs: a frozen buffer beside sharded parameters, a few AdamW steps with the decoder
constraint, and the full state dict gathered for saving."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from hf_dmsae import DMSAEModel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_sharded(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = tiny_model()
        model.train()
        fully_shard(model)
        assert type(model.W_dec).__name__ == "DTensor" and not hasattr(model.W_enc_frozen, "placements")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        generator = torch.Generator().manual_seed(rank)
        for _ in range(5):
            model(torch.randn(64, 16, generator=generator)).loss.backward()
            model.remove_parallel_decoder_grad()
            optimizer.step()
            optimizer.zero_grad()
            model.normalize_decoder()
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def test_fully_sharded_training_keeps_the_core_frozen_and_gathers_a_full_state_dict(tmp_path):
    out = str(tmp_path / "state.pt")
    mp.spawn(_train_sharded, args=(2, _free_port(), out), nprocs=2, join=True)
    state = torch.load(out)
    start = tiny_model()
    assert torch.equal(state["W_enc_frozen"], start.W_enc_frozen)
    assert not torch.equal(state["W_enc_trainable"], start.W_enc_trainable)
    assert state["threshold"] > 0
    reloaded = DMSAEModel(start.config)
    reloaded.load_state_dict(state)
    torch.testing.assert_close(reloaded.W_dec.norm(dim=1), torch.ones(128))
