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

# README's recipe ("Checkpoints and resuming"): the main job's command plus a ModelCheckpoint...
README_CHECKPOINTS = [
    "--trainer.callbacks+=ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps",
    "{every}",
    "--trainer.callbacks.save_last",
    "true",
]
# ...at test size: 80 training rows / batch 16 = 5 batches per epoch; 12 steps cross two epoch
# boundaries. LoRA dropout and the warmup-decay schedule make RNG and scheduler state matter;
# validation every 4 steps runs between the checkpoint and the next training step.
SMALL = [
    "--trainer.max_steps",
    "12",
    "--trainer.val_check_interval",
    "4",
    "--trainer.enable_progress_bar",
    "false",
    "--model.init_args.method.init_args.dropout",
    "0.1",
    "--data.init_args.synthetic_train_size",
    "80",
    "--data.init_args.synthetic_val_size",
    "8",
    "--data.init_args.batch_size",
    "16",
]

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


def _fit(cwd: Path, every: int, *args: str) -> subprocess.CompletedProcess:
    """``ftlab fit --config configs/lora.yaml`` + README's checkpoint flags, run in ``cwd`` (so its
    outputs land in ``cwd/runs/lora/version_N`` as they would for a user)."""
    cwd.mkdir(exist_ok=True)
    (cwd / "killer.py").write_text(textwrap.dedent(KILLER))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd)}
    cmd = [
        sys.executable,
        "-m",
        "ftlab.cli",
        "fit",
        "--config",
        str(ROOT / "configs" / "lora.yaml"),
        *[a.format(every=every) for a in README_CHECKPOINTS],
        *SMALL,
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _adapter(cwd: Path, version: int) -> dict[str, torch.Tensor]:
    return load_file(cwd / "runs" / "lora" / f"version_{version}" / "adapter" / "adapter.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    cwd = tmp_path_factory.mktemp("uninterrupted")
    done = _fit(cwd, 100)
    assert done.returncode == 0, done.stderr[-3000:]
    return _adapter(cwd, 0)


@pytest.mark.parametrize(
    ("every", "kill_at", "resume_from"),
    [
        (
            3,
            8,
            "version_0/checkpoints/epoch=1-step=6.ckpt",
        ),  # the last checkpoint is mid-epoch (epoch 1, one batch in)
        (5, 7, "last"),  # README's command: the last checkpoint closed epoch 0
    ],
)
def test_sigkill_then_resume_gives_the_uninterrupted_weights(
    tmp_path, uninterrupted, every, kill_at, resume_from
):
    killed = _fit(
        tmp_path, every, "--trainer.callbacks+=killer.KillAt", f"--trainer.callbacks.step={kill_at}"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    first = tmp_path / "runs" / "lora" / "version_0"
    assert not (first / "adapter").exists()  # it never reached the end
    kept = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}

    ckpt = resume_from if resume_from == "last" else str(tmp_path / "runs" / "lora" / resume_from)
    resumed = _fit(tmp_path, every, "--ckpt_path", ckpt)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr
    assert "not resumable" not in resumed.stderr
    final = _adapter(tmp_path, 1)  # the resumed run writes a directory of its own...
    assert {
        p: p.read_bytes() for p in first.rglob("*") if p.is_file()
    } == kept  # ...and leaves the first as it was
    assert final.keys() == uninterrupted.keys()
    for key in final:
        assert torch.equal(final[key], uninterrupted[key]), key


def test_resume_without_rng_state_would_differ(tmp_path, uninterrupted):
    """The check above can fail: resuming from a checkpoint whose RNG state is dropped (dropout
    masks change) ends with other weights."""
    killed = _fit(tmp_path, 3, "--trainer.callbacks+=killer.KillAt", "--trainer.callbacks.step=8")
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "runs" / "lora" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert "RestoreRNG" in ckpt["callbacks"]
    del ckpt["callbacks"]["RestoreRNG"]
    torch.save(ckpt, last)
    resumed = _fit(tmp_path, 3, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = _adapter(tmp_path, 1)
    assert any(not torch.equal(final[k], uninterrupted[k]) for k in final)


def test_last_with_no_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    done = _fit(tmp_path, 3, "--ckpt_path", "last")
    assert done.returncode == 2
    assert "--ckpt_path last: no last checkpoint under runs/lora" in done.stderr
    assert (
        "Traceback" not in done.stderr and not (tmp_path / "runs" / "lora" / "version_0" / "adapter").exists()
    )
