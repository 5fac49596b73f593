"""Two CPU processes with gloo: DDP and FSDP2 against one process, DDP with gradient
checkpointing + LoRA, FSDP2 save/resume.

Each run goes through the real `ftlab` console script, because Lightning relaunches it per rank.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

ROOT = Path(__file__).parents[1]
SMALL = [
    "--data.init_args.synthetic_train_size",
    "128",
    "--data.init_args.synthetic_val_size",
    "8",
    "--trainer.logger",
    "false",
]

pytestmark = pytest.mark.distributed


def _fit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "ftlab.cli",
        "fit",
        "--config",
        "configs/lora.yaml",
        *SMALL,
        f"--trainer.default_root_dir={tmp_path}",
        *args,
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# Packed text (every sample max_length tokens): a global batch's token-mean loss is then the mean
# of the ranks' means. LoRA dropout is off; the learning rate warms up and decays.
CURVE_CONFIG = """
seed_everything: 0
trainer:
  max_steps: 6
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_checkpointing: false
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: recorder.RecordLoss
      init_args: {{path: losses.json}}
model:
  class_path: ftlab.objectives.CausalLM
  init_args:
    backbone: {{name_or_path: tiny-llama}}
    method:
      class_path: ftlab.peft.{method}
      init_args: {{rank: 4, targets: [q_proj, v_proj, down_proj]}}
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {{lr: 0.01}}
    scheduler:
      class_path: ftlab.optim.WarmupLinear
      init_args: {{warmup: 2}}
data:
  class_path: ftlab.data.TextData
  init_args: {{source: synthetic, synthetic_size: 300, max_length: 32, packing: true}}
"""

RECORDER = '''
import json
import lightning as L

class RecordLoss(L.Callback):
    """The loss of the whole global batch at each step (the mean over ranks)."""

    def __init__(self, path: str):
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            with open(trainer.default_root_dir + "/" + self.path, "w") as f:
                json.dump(self.losses, f)
'''


def _curve(run_dir: Path, *args: str, method: str = "LoRA", with_log: bool = False):
    run_dir.mkdir()
    (run_dir / "curve.yaml").write_text(CURVE_CONFIG.format(method=method))
    (run_dir / "recorder.py").write_text(RECORDER)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(run_dir)}
    cmd = [
        sys.executable,
        "-m",
        "ftlab.cli",
        "fit",
        "--config",
        str(run_dir / "curve.yaml"),
        *args,
        f"--trainer.default_root_dir={run_dir}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = json.loads((run_dir / "losses.json").read_text())
    adapter = load_file(run_dir / "version_0" / "adapter" / "adapter.safetensors")
    return (losses, adapter, done.stdout + done.stderr) if with_log else (losses, adapter)


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor. Not element by element: Adam divides each gradient by
    its own running scale, so an element whose gradient is ~0 turns a rounding difference between
    reduction orders (one process vs two) into a step-sized one; the tensor as a whole stays close."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_ddp_and_fsdp_follow_the_single_process_loss_curve(tmp_path):
    """Same global batch (16 = 16 x 1 process = 8 x 2 processes), same samples in each step."""
    single, single_w = _curve(tmp_path / "single", "--data.init_args.batch_size", "16")
    ddp, ddp_w = _curve(
        tmp_path / "ddp", "--config", "configs/strategy/ddp.yaml", "--data.init_args.batch_size", "8"
    )
    fsdp, fsdp_w = _curve(
        tmp_path / "fsdp", "--config", "configs/strategy/fsdp.yaml", "--data.init_args.batch_size", "8"
    )
    assert len(single) == 6 and any(v.abs().sum() > 0 for k, v in single_w.items() if k.endswith("lora_B"))
    assert ddp == pytest.approx(single, rel=1e-4) and fsdp == pytest.approx(single, rel=1e-4)
    for other in (ddp_w, fsdp_w):
        assert other.keys() == single_w.keys()
        for k in single_w:
            assert _relative_gap(other[k], single_w[k]) < 1e-3, k
    # a different global batch gives a different curve: the comparison can fail
    half, half_w = _curve(tmp_path / "half", "--data.init_args.batch_size", "8")
    assert half != pytest.approx(single, rel=1e-3)
    assert max(_relative_gap(half_w[k], single_w[k]) for k in single_w) > 1e-2


def test_qlora_under_fsdp_follows_the_single_process_loss_curve(tmp_path):
    """FSDP2 shards QLoRA's packed 4-bit codes (uint8 storage) with the rest and gathers them back."""
    single, single_w = _curve(tmp_path / "single", "--data.init_args.batch_size", "16", method="QLoRA")
    fsdp, fsdp_w = _curve(
        tmp_path / "fsdp",
        "--config",
        "configs/strategy/fsdp.yaml",
        "--data.init_args.batch_size",
        "8",
        method="QLoRA",
    )
    assert fsdp == pytest.approx(single, rel=1e-4)
    for k in single_w:
        assert _relative_gap(fsdp_w[k], single_w[k]) < 1e-3, k


def test_ddp_with_gradient_checkpointing_and_lora(tmp_path):
    _fit(
        tmp_path,
        "--config",
        "configs/strategy/ddp.yaml",
        "--model.init_args.backbone.gradient_checkpointing",
        "true",
        "--trainer.max_steps",
        "3",
        "--trainer.val_check_interval",
        "3",
    )
    state = load_file(tmp_path / "version_0" / "adapter" / "adapter.safetensors")
    assert state and all(torch.isfinite(v).all() for v in state.values())
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_B"))  # it trained
    assert json.loads((tmp_path / "version_0" / "summary.json").read_text())["steps"] == 3


def test_fsdp_adapter_only_sharded_checkpoint_resumes_exactly(tmp_path):
    fsdp = [
        "--config",
        "configs/strategy/fsdp.yaml",
        "--trainer.max_steps",
        "5",
        "--trainer.val_check_interval",
        "5",
    ]
    _fit(
        tmp_path / "a",
        *fsdp,
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.callbacks.save_top_k=-1",
    )
    (ckpt,) = (tmp_path / "a" / "version_0" / "checkpoints").glob(
        "*step=3.ckpt"
    )  # mid-epoch: 2 batches per rank and epoch
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard per rank
    saved = FileSystemReader(ckpt).read_metadata().state_dict_metadata
    tensors = [k for k in saved if k.startswith("state_dict.")]
    assert tensors and all(".lora_" in k for k in tensors), tensors  # the frozen base is not in it
    assert any(k.startswith("optimizer_0.state.") for k in saved)

    done = _fit(tmp_path / "b", *fsdp, "--ckpt_path", str(ckpt))
    assert "Restored all states" in done.stdout + done.stderr
    assert json.loads((tmp_path / "b" / "version_0" / "summary.json").read_text())["steps"] == 5
    # the resumed run ends where the uninterrupted one did (adapters gathered from the shards)
    first = load_file(tmp_path / "a" / "version_0" / "adapter" / "adapter.safetensors")
    second = load_file(tmp_path / "b" / "version_0" / "adapter" / "adapter.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_fsdp_fills_each_ranks_shard_from_the_checkpoint_as_a_plain_load_would(tmp_path, monkeypatch):
    """A pretrained checkpoint folder under FSDP2 is built empty, sharded, and each rank reads only its
    rows of every tensor (``ftlab.models.deferred``): the same loss curve and adapters as one process
    that loads it whole (run in this process). Packed-sample InstructionData with gradient accumulation:
    the per-token loss over the whole step (2 micro-batches x 2 ranks vs 4 micro-batches) agrees too."""
    from ftlab.cli import main
    from ftlab.models.backbone import Backbone
    from ftlab.models.tokenizer import byte_tokenizer

    torch.manual_seed(1)
    Backbone(pretrained=False).load("causal_lm").save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    args = [
        "--model.init_args.backbone.name_or_path",
        str(tmp_path / "base"),
        "--trainer.max_steps",
        "2",
        "--data.class_path",
        "ftlab.data.InstructionData",
        "--data.init_args.template",
        "alpaca_short",
        "--data.init_args.max_length",
        "192",
        "--data.init_args.packing",
        "true",
        "--data.init_args.synthetic_train_size",
        "48",
        "--data.init_args.batch_size",
        "2",
    ]
    fsdp, fsdp_w, log = _curve(
        tmp_path / "fsdp",
        "--config",
        "configs/strategy/fsdp.yaml",
        *args,
        "--trainer.accumulate_grad_batches",
        "2",
        with_log=True,
    )
    assert "each rank read its shard of 38 tensors" in log  # 36 in blocks + embeddings (tied head) + norm

    run = tmp_path / "single"
    run.mkdir()
    (run / "curve.yaml").write_text(CURVE_CONFIG.format(method="LoRA"))
    (run / "recorder.py").write_text(RECORDER)
    monkeypatch.syspath_prepend(str(run))
    main(
        [
            "fit",
            "--config",
            str(run / "curve.yaml"),
            *args,
            "--trainer.accumulate_grad_batches",
            "4",
            f"--trainer.default_root_dir={run}",
        ]
    )
    single = json.loads((run / "losses.json").read_text())
    single_w = load_file(run / "version_0" / "adapter" / "adapter.safetensors")
    # Each micro-batch returns its share of the step's per-token mean loss; FSDP's micro-batch j holds the
    # rows of the single process's micro-batches 2j and 2j + 1 (rank r takes every other row).
    assert len(single) == 8
    assert fsdp == pytest.approx([a + b for a, b in zip(single[::2], single[1::2])], rel=1e-4)
    assert single_w.keys() == fsdp_w.keys()
    for k in single_w:
        assert _relative_gap(fsdp_w[k], single_w[k]) < 1e-3, k
