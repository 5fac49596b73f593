"""FSDP2 sharding for ftlab objectives under Lightning's ``ModelParallelStrategy``.

``configs/strategy/fsdp.yaml`` selects ``ModelParallelStrategy(data_parallel_size=N,
tensor_parallel_size=1)`` (ftlab's subclass below); Lightning then hands each LightningModule a
``device_mesh`` and the objective calls ``shard`` at the end of ``configure_model``: every
transformer block becomes its own FSDP unit (``fully_shard``), then the whole module. Frozen base
weights (QLoRA's packed 4-bit codes included) and trainable adapters live in the same units;
FSDP2 shards both and only the trainable ones get gradients. On GPU, parameters are gathered in
bf16 and gradients reduced in fp32.

Checkpoints are sharded (one ``.distcp`` file per rank) and, with a pretrained base, hold only
the trainable tensors and their optimizer state: the frozen base is rebuilt from the backbone
before a resume loads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME  # beside the shards: all but tensors
from lightning.pytorch.strategies import ModelParallelStrategy as _LightningModelParallel
from torch import nn


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a HF transformer (``layers``, ``h``, ``layer``, ``blocks``)."""
    best: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "layer", "blocks"):
            if len(module) > len(best):
                best = list(module)
    if not best:
        raise ValueError(
            "FSDP sharding found no transformer blocks (a ModuleList named layers/h/layer/blocks)"
        )
    return best


def shard(module: nn.Module, model: nn.Module, mesh) -> None:
    """Apply FSDP2 to each block of ``model`` and then to ``module`` (which holds model and heads)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    policy = MixedPrecisionPolicy()
    if dp_mesh.device_type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(module, mesh=dp_mesh, mp_policy=policy)


def mesh_device(mesh) -> torch.device:
    """This rank's device on ``mesh`` (its CUDA device, or the CPU under gloo)."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


class ModelParallelStrategy(_LightningModelParallel):
    """Lightning's ``ModelParallelStrategy`` that resumes sharded checkpoints holding a subset of
    the model's tensors (the objective saves only what trains; Lightning's loader needs every key).
    Same arguments as Lightning's."""

    loads_partial_checkpoints = True

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():  # a single-file (full) checkpoint: Lightning's own loading
            return super().load_checkpoint(path, weights_only=weights_only)
        # Tensors missing from the checkpoint (the frozen base) keep the values they were built with.
        model_state = {"state_dict": get_model_state_dict(self.model)}
        load(model_state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
        set_model_state_dict(self.model, model_state["state_dict"], options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            optim_state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(
                self.model,
                optimizer,
                optim_state_dict=optim_state[f"optimizer_{i}"],
                options=StateDictOptions(cpu_offload=True),
            )
        return torch.load(
            path / _METADATA_FILENAME, weights_only=True if weights_only is None else weights_only
        )
