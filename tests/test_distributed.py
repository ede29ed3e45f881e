"""Several processes over gloo on the CPU, spawned here: FSDP2 (accelerate turns FSDP into DDP without GPUs, so
this drives torch's `fully_shard` directly, as accelerate does on GPUs), dead-latent resampling under DDP and the
merge of attribution quantiles."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from hf_dmsae import DMSAEModel
from hf_dmsae.method.attribution import StreamingQuantile
from hf_dmsae.run.resampling import resample_dead_latents
from hf_dmsae.run.trainer import whole_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, *args) -> None:
    """Run `worker(rank, *args)` in two processes joined by a gloo process group."""
    mp.spawn(_in_process_group, args=(worker, _free_port(), *args), nprocs=2, join=True)


def _in_process_group(rank: int, worker, port: int, *args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        worker(rank, *args)
        dist.barrier()  # no process tears its group down while another still talks to it
    finally:
        dist.destroy_process_group()


def _train_sharded(rank: int, out: str) -> None:
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
    whole = whole_model(model)  # what attribution scores: an unsharded copy on every process
    assert not isinstance(whole.W_dec, type(model.W_dec)) and whole.W_dec.shape == (128, 16)
    if rank == 0:  # with cpu_offload the full state dict lands on the main process only
        assert torch.equal(whole.W_dec, state["W_dec"])
        torch.save(state, out)


def test_fully_sharded_training_keeps_the_core_frozen_and_gathers_a_full_state_dict(tmp_path):
    out = str(tmp_path / "state.pt")
    _spawn(_train_sharded, out)
    state = torch.load(out)
    start = tiny_model()
    assert torch.equal(state["W_enc_frozen"], start.W_enc_frozen)
    assert not torch.equal(state["W_enc_trainable"], start.W_enc_trainable)
    assert state["threshold"] > 0
    reloaded = DMSAEModel(start.config)
    reloaded.load_state_dict(state)
    torch.testing.assert_close(reloaded.W_dec.norm(dim=1), torch.ones(128))


def _resample_own_batch(rank: int, out: str) -> None:
    model = tiny_model()
    dead = torch.arange(100, 128)
    model.tokens_since_fired[dead] = model.config.dead_tokens_threshold
    batch = torch.randn(64, 16, generator=torch.Generator().manual_seed(rank))  # each process its own rows
    resample_dead_latents(model, batch, None, torch.Generator().manual_seed(rank))
    torch.save(model.state_dict(), f"{out}.{rank}")


def test_resampling_on_each_process_s_own_batch_leaves_the_replicas_equal(tmp_path):
    out = str(tmp_path / "state")
    _spawn(_resample_own_batch, out)
    first, second = (torch.load(f"{out}.{rank}") for rank in (0, 1))
    assert not torch.equal(first["W_dec"][100:], tiny_model().W_dec[100:]), "nothing was resampled"
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def _quantile_share(rank: int, values: torch.Tensor, out: str) -> None:
    quantile = StreamingQuantile(values.shape[1], 0.97, max_rows=len(values))
    quantile.update(values[rank::2])  # each process sees half of the rows
    quantile.gather(torch.device("cpu"))
    torch.save((quantile.count, quantile.compute()), f"{out}.{rank}")


def test_attribution_quantiles_merge_exactly_across_processes(tmp_path):
    values = torch.rand(301, 5) * (torch.rand(301, 5) < 0.2)
    _spawn(_quantile_share, values, str(tmp_path / "q"))
    for rank in range(2):
        count, scores = torch.load(f"{tmp_path / 'q'}.{rank}")
        assert count == 301
        torch.testing.assert_close(scores, torch.quantile(values, 0.97, dim=0), rtol=0, atol=1e-7)
