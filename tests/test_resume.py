"""Exact resume: a fit killed with SIGKILL and resumed from its last checkpoint ends with the same
weights as a fit that was never interrupted (optimizer, scheduler, RNG and data position restored).

Each run is the real ``ftlab fit`` in a subprocess, so the kill is a real one.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]

# 80 training rows / batch 16 = 5 batches per epoch; 12 steps cross two epoch boundaries.
# LoRA dropout and a warmup-decay schedule make RNG and scheduler state matter; validation
# every 4 steps runs between the checkpoint and the next training step.
CONFIG = """
trainer:
  max_steps: 12
  val_check_interval: 4
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: {every}, save_last: true, save_top_k: -1}}
model:
  init_args:
    method:
      init_args: {{dropout: 0.1}}
data:
  init_args: {{synthetic_train_size: 80, synthetic_val_size: 8, batch_size: 16}}
"""

KILLER = """
import os, signal
import lightning as L

class KillAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def _fit(run_dir: Path, every: int, *args: str) -> subprocess.CompletedProcess:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "resume.yaml").write_text(CONFIG.format(every=every))
    (run_dir / "killer.py").write_text(textwrap.dedent(KILLER))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(run_dir)}
    cmd = [sys.executable, "-m", "ftlab.cli", "fit", "--config", "configs/lora.yaml",
           "--config", str(run_dir / "resume.yaml"), f"--trainer.default_root_dir={run_dir}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    done = _fit(run_dir, 100)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(run_dir / "adapter" / "adapter.safetensors")


@pytest.mark.parametrize(("every", "kill_at", "resume_from"), [
    (3, 8, "epoch=1-step=6.ckpt"),  # the last checkpoint is mid-epoch (epoch 1, one batch in), by path
    (5, 7, "last"),                 # the last checkpoint closed epoch 0; Lightning's "last"
])
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path, uninterrupted, every, kill_at, resume_from):
    killed = _fit(tmp_path, every, "--trainer.callbacks+=killer.KillAt", f"--trainer.callbacks.step={kill_at}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "adapter").exists()  # it never reached the end

    ckpt = resume_from if resume_from == "last" else str(tmp_path / "checkpoints" / resume_from)
    resumed = _fit(tmp_path, every, "--ckpt_path", ckpt)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr
    assert "not resumable" not in resumed.stderr
    final = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert final.keys() == uninterrupted.keys()
    for key in final:
        assert torch.equal(final[key], uninterrupted[key]), key


def test_resume_without_rng_state_would_differ(tmp_path, uninterrupted):
    """The check above can fail: resuming from a checkpoint whose RNG state is dropped (dropout
    masks change) ends with other weights."""
    killed = _fit(tmp_path, 3, "--trainer.callbacks+=killer.KillAt", "--trainer.callbacks.step=8")
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert "RestoreRNG" in ckpt["callbacks"]
    del ckpt["callbacks"]["RestoreRNG"]
    torch.save(ckpt, last)
    resumed = _fit(tmp_path, 3, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert any(not torch.equal(final[k], uninterrupted[k]) for k in final)
