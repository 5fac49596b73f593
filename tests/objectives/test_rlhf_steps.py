"""The RLHF steps chained by their adapters: SFT adapter -> reward model from the SFT model -> a policy
whose start and reference are the SFT model, scored by that reward model (experiments/rlhf_pipeline)."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from ftlab.data.preference import encode_response, response_frame
from ftlab.models.backbone import Backbone
from ftlab.objectives import GRPO, PPO, CausalLM, RewardModel
from ftlab.peft import LoRA, io
from ftlab.rollouts import response_logprobs

HAS_DIGIT = "ftlab.rewards.has_char"


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """An SFT adapter (LoRA with non-zero B, so folding it changes the model) and a reward model
    trained on top of it, both saved as their runs save them."""
    tmp = tmp_path_factory.mktemp("rlhf")
    L.seed_everything(0)
    sft = CausalLM(Backbone(), LoRA(rank=4, targets=["q_proj", "v_proj"]))
    sft.configure_model()
    for name, p in sft.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    sft_path = str(sft.save_adapter(tmp / "sft"))
    rm = RewardModel(Backbone(), LoRA(rank=2), base_adapter=sft_path)
    rm.configure_model()
    torch.nn.init.normal_(rm.head[1].weight)
    rm_path = str(rm.save_adapter(tmp / "rm"))
    return sft.eval(), sft_path, rm.eval(), rm_path, tmp


def _ids(n: int = 3, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


def test_the_policy_starts_from_the_sft_model_which_is_also_its_reference(steps):
    sft, sft_path, _, rm_path, _ = steps
    policy = PPO(Backbone(), LoRA(rank=2), base_adapter=sft_path, reward_model=rm_path, max_new_tokens=4)
    policy.configure_model()
    ids, mask = _ids()
    responses, P = ids[:, 6:], 6
    with torch.no_grad():
        want = response_logprobs(sft.model, ids, mask, responses, P)["logprobs"]
        start = response_logprobs(policy.model, ids, mask, responses, P)["logprobs"]
        for name, p in policy.model.named_parameters():  # train the new LoRA a little: only the policy moves
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
        with policy.reference():
            ref = response_logprobs(policy.model, ids, mask, responses, P)["logprobs"]
        moved = response_logprobs(policy.model, ids, mask, responses, P)["logprobs"]
        plain = response_logprobs(Backbone().load("causal_lm").eval(), ids, mask, responses, P)["logprobs"]
    assert torch.allclose(start, want, atol=1e-4)  # folded SFT + zero-init LoRA == the SFT model
    assert torch.allclose(ref, want, atol=1e-4)  # the reference is the SFT model, not the pretrained base
    assert not torch.allclose(plain, want, atol=1e-2)  # (which differs)
    assert not torch.allclose(moved, want, atol=1e-3)
    assert not any(p.requires_grad for n, p in policy.model.named_parameters() if "lora_" not in n)


def test_the_reward_model_is_rebuilt_on_the_sft_trunk_it_was_trained_on(steps):
    _, sft_path, rm, rm_path, _ = steps
    meta = json.loads((Path(rm_path) / io.CONFIG).read_text())
    assert meta["extra"]["base_adapter"]["path"] == sft_path
    policy = GRPO(Backbone(), LoRA(rank=2), base_adapter=sft_path, reward_model=rm_path, num_generations=2)
    policy.configure_model()
    prompts, responses = ["Twice fen is", "42 + 17 ="], [" fen fen.", " 59"]
    scores, _ = policy.rewards(prompts, responses)
    tok = policy.tokenizer
    frame = response_frame(tok)
    ids = [encode_response(tok, frame, p, r.strip(), 512)[0] for p, r in zip(prompts, responses)]
    with torch.no_grad():
        direct = torch.cat([rm(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long)) for x in ids])
    assert torch.allclose(scores, direct, atol=1e-5)


def test_an_adapter_loaded_onto_another_base_than_its_own_is_refused(steps):
    _, sft_path, _, rm_path, tmp = steps
    with pytest.raises(ValueError, match="was trained on top of base_adapter .* set base_adapter"):
        RewardModel(Backbone(), adapter=rm_path).configure_model()
    with pytest.raises(ValueError, match="trained on the plain backbone, not on base_adapter"):
        PPO(Backbone(), adapter=sft_path, base_adapter=sft_path, reward_fn=HAS_DIGIT).configure_model()
    with pytest.raises(ValueError, match="base_adapter .*RewardModel; it must be a CausalLM run's adapter"):
        PPO(Backbone(), LoRA(rank=2), base_adapter=rm_path, reward_fn=HAS_DIGIT).configure_model()
    moved = tmp / "elsewhere"
    moved.mkdir()
    config = (Path(rm_path) / io.CONFIG).read_text()
    (moved / io.CONFIG).write_text(config.replace(sft_path, str(tmp / "gone")))
    (moved / io.WEIGHTS).write_bytes((Path(rm_path) / io.WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match="trained on top of base_adapter .*gone, which is not there"):
        PPO(Backbone(), LoRA(rank=2), reward_model=str(moved)).configure_model()


PIPELINE = Path(__file__).parents[2] / "experiments" / "rlhf_pipeline"


@pytest.mark.parametrize("config", sorted(PIPELINE.glob("*.yaml")), ids=lambda p: p.stem)
def test_the_pipeline_configs_parse_and_build(config, monkeypatch):
    # fitting them needs the earlier steps' adapters (experiments/rlhf_pipeline/run.py); keys must stay valid
    from ftlab.cli import FtlabCLI
    from ftlab.objectives._base import Objective

    monkeypatch.chdir(config.parents[2])
    cli = FtlabCLI(
        Objective,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(config), "--trainer.logger=false"],
    )
    assert cli.datamodule.max_length == cli.model.max_length
    if config.stem != "sft":
        assert cli.model.base_adapter == "experiments/rlhf_pipeline/runs/sft/seed0/adapter"
