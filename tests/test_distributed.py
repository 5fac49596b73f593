"""Two CPU processes with gloo: DDP (with gradient checkpointing + LoRA) and FSDP2 save/resume.

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

ROOT = Path(__file__).parents[1]
SMALL = ["--data.init_args.synthetic_train_size", "128", "--data.init_args.synthetic_val_size", "8",
         "--trainer.logger", "false"]

pytestmark = pytest.mark.distributed


def _fit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ftlab.cli", "fit", "--config", "configs/lora.yaml", *SMALL,
           f"--trainer.default_root_dir={tmp_path}", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_ddp_with_gradient_checkpointing_and_lora(tmp_path):
    _fit(tmp_path, "--config", "configs/strategy/ddp.yaml", "--model.init_args.backbone.gradient_checkpointing", "true",
         "--trainer.max_steps", "3", "--trainer.val_check_interval", "3")
    state = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert state and all(torch.isfinite(v).all() for v in state.values())
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_B"))  # it trained
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


def test_fsdp_writes_sharded_checkpoint_and_resumes(tmp_path):
    # constant lr: the restored warmup-linear schedule would end at the first run's last step
    _fit(tmp_path, "--config", "configs/strategy/fsdp.yaml", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
         "--model.init_args.scheduler", "null")
    ckpt = next((tmp_path / "checkpoints").iterdir())
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard per rank
    first = load_file(tmp_path / "adapter" / "adapter.safetensors")
    done = _fit(tmp_path, "--config", "configs/strategy/fsdp.yaml", "--trainer.max_steps", "5",
                "--trainer.val_check_interval", "5", "--model.init_args.scheduler", "null", "--ckpt_path", str(ckpt))
    assert "Restored all states" in done.stdout + done.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 5
    second = load_file(tmp_path / "adapter" / "adapter.safetensors")
    # the adapter was gathered from the shards into full tensors, and training went on from them
    assert first.keys() == second.keys() and all(first[k].shape == second[k].shape for k in first)
    assert any(not torch.equal(first[k], second[k]) for k in first)
