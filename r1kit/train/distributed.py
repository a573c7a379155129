"""One training script on one process or many: torchrun, DDP, FSDP2.

Launched plainly, everything here is a no-op (world size 1). Under `torchrun` the environment
carries RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR, and `setup()` joins the process group: NCCL
when there are GPUs, gloo on CPU. Multi-node is torchrun's rendezvous; nothing here changes.

Models that fit on one device are replicated with DDP (gradients all-reduced, averaged); models
that do not are sharded with FSDP2 (`fully_shard` on every decoder block and then the root, so a
block's full weights exist only while it runs). Either way the gradient each rank ends with is the
mean over ranks, which the trainer relies on to make N processes equal one process over the
same global batch.

The model is wrapped in `LossModule` first: DDP and FSDP hook a module's `forward`, and the
trainer calls `model.loss(...)`, so the loss itself has to be that forward.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

MODES = ("auto", "none", "ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no GPU is visible; use device='cpu' or 'auto'")
        return torch.device("cuda", local_rank)
    return torch.device(device)


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; pick this rank's device."""
    if not launched_by_torchrun():
        return DistInfo(device=pick_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks, in place, wherever it lives: NCCL reduces only GPU tensors, so a CPU
    tensor (a step's loss sums, say) goes through this rank's GPU and back; gloo takes it as it is."""
    if not dist.is_initialized():
        return t
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        t.copy_(on_gpu)
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class LossModule(nn.Module):
    """forward(input_ids, loss_mask) == model.loss(...): what DDP/FSDP wrap."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.model.loss(input_ids, loss_mask)


def resolve_mode(mode: str, info: DistInfo) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown distributed mode {mode!r}; choose one of {', '.join(MODES)}")
    if info.world_size == 1:
        return "none"
    return "ddp" if mode in ("auto", "none") else mode


def wrap(model: nn.Module, info: DistInfo, mode: str = "auto") -> tuple[nn.Module, str]:
    """(module whose forward is the loss, the mode used). The model's own parameters stay the ones
    to optimise (FSDP2 turns them into DTensor shards in place)."""
    mode = resolve_mode(mode, info)
    loss_module = LossModule(model)
    if mode == "none":
        return loss_module, mode
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers=False: each rank counts its own expert load (MoE), which the bias update
        # all-reduces; broadcasting rank 0's buffers at every forward would overwrite those counts.
        ddp = DDP(loss_module, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                  broadcast_buffers=False)
        return ddp, mode
    from torch.distributed.fsdp import fully_shard

    for block in list(model.model.layers) + list(getattr(model, "mtp", [])):
        fully_shard(block)
    fully_shard(loss_module)
    return loss_module, mode


def no_sync(wrapped: nn.Module, mode: str, last_micro_step: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    import contextlib

    if mode == "ddp" and not last_micro_step:
        return wrapped.no_sync()
    if mode == "fsdp":
        wrapped.set_requires_gradient_sync(last_micro_step)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------- full state for checkpoints


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 sharded this model (or a part of it) in place."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def cpu_model(config, state: dict) -> nn.Module:
    """A CPU Transformer holding a gathered full state dict (what rank 0 saves under FSDP)."""
    from r1kit.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, assign=True, strict=False)
    return model


def saveable_model(model: nn.Module) -> nn.Module | None:
    """The model with its full weights for rank 0 to write, or None on the other ranks. Under FSDP
    every rank must call this: the shards are gathered (to rank 0's CPU) collectively."""
    if is_sharded(model):
        full = full_model_state(model, "fsdp")
        return cpu_model(model.config, full) if not dist.is_initialized() or dist.get_rank() == 0 else None
    return model if not dist.is_initialized() or dist.get_rank() == 0 else None


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict into a model, sharded by FSDP2 or not."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def full_model_state(model: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (gathered on rank 0 under FSDP; every rank must call it)."""
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_options())
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, the same for 1 process, DDP and FSDP, so a run can
    resume at another world size or sharding mode."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
