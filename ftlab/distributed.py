"""FSDP2 sharding for ftlab objectives under Lightning's ``ModelParallelStrategy``.

``configs/strategy/fsdp.yaml`` selects ``ModelParallelStrategy(data_parallel_size=N,
tensor_parallel_size=1)``; Lightning then hands each LightningModule a ``device_mesh`` and the
objective calls ``shard`` at the end of ``configure_model``: every transformer block becomes its
own FSDP unit (``fully_shard``), then the whole module. Frozen base weights and trainable adapters
live in the same units; FSDP2 shards both and only the trainable ones get gradients. On GPU,
parameters are gathered in bf16 and gradients reduced in fp32.
"""

from __future__ import annotations

import torch
from torch import nn


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a HF transformer (``layers``, ``h``, ``layer``, ``blocks``)."""
    best: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "layer", "blocks"):
            if len(module) > len(best):
                best = list(module)
    if not best:
        raise ValueError("FSDP sharding found no transformer blocks (a ModuleList named layers/h/layer/blocks)")
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
