"""What every objective shares: backbone + method -> model, optimizers, adapter-only checkpoints.

An objective subclasses ``Objective`` and implements ``build(self)`` (load the backbone kind it
needs and any head) plus its steps. The method is applied here, once, whatever the objective.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ftlab.models.backbone import Backbone
from ftlab.optim import WarmupLinear
from ftlab.peft import io
from ftlab.peft.full import Full
from ftlab.peft.method import Method, describe

log = logging.getLogger("ftlab")


class Objective(L.LightningModule):
    """Base of ftlab's LightningModules (see subclasses for the arguments)."""

    #: Attribute names of modules the objective adds beside the backbone (heads); they always train.
    heads: tuple[str, ...] = ()
    #: The backbone kind ``ftlab export`` writes for this objective's adapters (None: nothing to export).
    export_kind: str | None = None

    def __init__(
        self,
        backbone: Backbone | None,
        method: Method | None,
        optimizer: OptimizerCallable,
        scheduler: LRSchedulerCallable | None,
        adapter: str | None,
        max_length: int | None,
    ):
        super().__init__()
        self.backbone = backbone or Backbone()
        self.method = method or Full()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.adapter_path, self.max_length = adapter, max_length
        self.model: nn.Module | None = None
        self._tokenizer = None
        # Checkpoints hold only what trains (see on_save_checkpoint): load them non-strictly.
        self.strict_loading = False
        self.save_hyperparameters(
            {"backbone": self.backbone.to_dict(), "method": describe(self.method), "adapter": adapter}
        )

    # ------------------------------------------------------------------ model
    def build(self) -> nn.Module:
        """Load the backbone (the kind this objective needs) and create heads; return the trunk
        that the method adapts."""
        raise NotImplementedError

    def configure_model(self) -> None:
        """Build the backbone, apply the method (or load the adapter), and under a device mesh shard it
        with FSDP2. Sharded, a pretrained safetensors checkpoint is read shard by shard: the model is
        built empty, sharded, then each rank reads its own rows (``ftlab.models.deferred``), unless
        the method needs the base weights to start (QLoRA, PiSSA, DoRA...)."""
        if self.model is not None:  # Lightning may call this more than once
            return
        placeholders = None
        if self.device_mesh is not None:
            rng = torch.random.get_rng_state()
            try:
                with self.backbone.empty_for_sharding():
                    self._adapt(self.build())
                placeholders = self.backbone.placeholders
                reason = placeholders.check(self.model) if placeholders is not None else None
            except RuntimeError as err:  # e.g. PiSSA writing into a placeholder; a real error comes back
                if self.backbone.placeholders is None:
                    raise
                placeholders = self.backbone.placeholders
                reason = f"the method wrote into the base weights ({err})"
            if reason:  # start again from a plain load, with the random state it would have had
                log.info("FSDP: every rank loads %s whole: %s", self.backbone.name_or_path, reason)
                torch.random.set_rng_state(rng)
                self.model, placeholders = None, None
        if self.model is None:
            self._adapt(self.build())
        if placeholders is not None:
            placeholders.to_meta(self.model)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 per transformer block
            from ftlab.distributed import mesh_device, shard

            shard(self, self.model, self.device_mesh)
        if placeholders is not None:
            n = placeholders.fill(self, mesh_device(self.device_mesh))
            log.info("FSDP: each rank read its shard of %d tensors from %s", n, self.backbone.name_or_path)

    def _adapt(self, trunk: nn.Module) -> None:
        self.model = trunk
        self._check_positions()
        if self.adapter_path:
            self.method, extra = self.load_adapter(self.adapter_path)
            self._load_heads(extra)
        else:
            self.method.apply(trunk)
        for name in self.heads:
            getattr(self, name).requires_grad_(True)

    def load_adapter(self, path: str) -> tuple[Method, dict[str, torch.Tensor]]:
        if (Path(path) / io.PEFT_CONFIG).exists():
            return io.load_peft_adapter(path, self.model), {}
        return io.load_adapter(path, self.model, self.backbone.fingerprint(self.model))

    def _check_positions(self) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if self.max_length and limit and self.max_length > limit:
            raise ValueError(
                f"data.max_length={self.max_length} exceeds {self.backbone.name_or_path}'s "
                f"{limit} positions (max_position_embeddings)"
            )

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.backbone.tokenizer()
        return self._tokenizer

    # ------------------------------------------------------------------ adapters
    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{h}.{k}": v for h in self.heads for k, v in getattr(self, h).state_dict().items()}

    def _load_heads(self, state: dict[str, torch.Tensor]) -> None:
        for h in self.heads:
            part = {k[len(h) + 1 :]: v for k, v in state.items() if k.startswith(h + ".")}
            if part:
                getattr(self, h).load_state_dict(part)

    def save_adapter(self, path: str | Path, write: bool = True) -> Path:
        """Adapter-only file: the method's tensors, the heads, and the base fingerprint.

        Under FSDP every rank must call this (shards are gathered); only ``write=True`` writes.
        """
        return io.save_adapter(
            path,
            self.model,
            self.method,
            self.backbone.fingerprint(self.model),
            extra_tensors=self.head_state_dict(),
            extra={"objective": f"{type(self).__module__}.{type(self).__qualname__}", **self.adapter_extra()},
            write=write,
        )

    def adapter_extra(self) -> dict[str, Any]:
        """More of what this objective's adapter files record (JSON), beside the objective's name."""
        return {}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep trainable tensors only: the frozen base is rebuilt from the backbone on load.

        A randomly initialised base is saved whole, since nothing else could rebuild it. So is a
        model sharded with FSDP2 under Lightning's own ``ModelParallelStrategy``, whose loader needs
        every key (``ftlab.distributed.ModelParallelStrategy`` does not).
        """
        # LightningCLI reads "hyper_parameters" of a --ckpt_path file back as model arguments; ours
        # describe the run (the config file rebuilds it), so they are kept under another key.
        checkpoint["ftlab_hparams"] = checkpoint.pop("hyper_parameters", {})
        partial = self.device_mesh is None or getattr(
            self.trainer.strategy, "loads_partial_checkpoints", False
        )
        if not self.backbone.pretrained or not partial:
            return
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        # The method's groups (LoRA+ gives B a scaled learning rate), then whatever else trains (heads).
        groups = [g for g in self.method.param_groups(self.model) if g["params"]]
        grouped = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in grouped]
        groups += [{"params": rest}] if rest else []
        if not groups:
            raise ValueError(f"{type(self.method).__name__} left no trainable parameters")
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # The run length is read here, not in configure_optimizers: asking for it there makes
        # Lightning build the train loader before a checkpoint is restored, and a resumed fit would
        # not continue from the saved data position. A resumed scheduler already has its length.
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, WarmupLinear) and config.scheduler.total_steps is None:
                config.scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return int(batch["input_ids"].size(0))
