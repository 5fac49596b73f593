"""PPO end to end on a tiny model, the reference policy, reward sources and bad inputs."""

import json
import statistics

import lightning as L
import pytest
import torch

from ftlab.data import PreferenceData, PromptData
from ftlab.models.backbone import Backbone
from ftlab.objectives import PPO, RewardModel
from ftlab.peft import Full, LoRA, io
from ftlab.rollouts import response_logprobs

LORA = {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


ITERATIONS = 8


def _fit(model, dm, tmp_path, iterations: int):
    # one training batch is one PPO iteration (a variable number of optimizer steps with target_kl)
    dm.setup()
    per_epoch = min(iterations, -(-len(dm.splits["train"]) // dm.batch_size))
    assert iterations % per_epoch == 0
    L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=iterations // per_epoch,
        limit_train_batches=per_epoch,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    ).fit(model, dm)


def _ppo(backbone=None, **kw):
    args = {
        "reward_fn": "ftlab.rewards.has_char",
        "num_rollouts": 32,
        "chunk_size": 32,
        "mini_batch_size": 16,
        "ppo_epochs": 4,
        "max_new_tokens": 16,
        "init_kl_coef": 0.2,
        "target": 4.0,
        "horizon": 64,
        "optimizer": lambda p: torch.optim.AdamW(p, lr=3e-3),
    }
    return PPO(backbone or Backbone(), LoRA(**LORA), **{**args, **kw})


def run(seed: int, tmp_path, iterations: int = ITERATIONS, **kw) -> PPO:
    """PPO on the embedded default (LoRA on the pretrained tiny-llama); reward: the response holds a digit.
    The base does so about a third of the time (when the sentence after its answer is an arithmetic one).
    This is the setting of experiments/ppo_stability (variant tkl10: PPO's defaults), its first 8
    iterations."""
    L.seed_everything(seed)
    model = _ppo(**kw)
    _fit(model, PromptData(batch_size=32, synthetic_size=512, max_length=48), tmp_path, iterations)
    return model


def test_kl_stays_bounded_and_the_reward_rises_on_three_seeds(tmp_path):
    # Before target_kl, the KL to the reference ran away (17-29 nats) on 5 of 16 seeds of this setting
    # within 14 iterations, and to 45.9 on an AMD EPYC CPU with the seed that passed on Intel. With PPO's
    # default target_kl (0.1), seeds 0-15 (experiments/rl_test_calibration): the largest KL of these 8
    # iterations was 7.2 nats at worst (median 2.3; without target_kl up to 13.4), and the reward of
    # iterations 5-8 beat 1-4 by 0.054 on the median seed (worst -0.015); any 3 of those 16 runs have a
    # positive mean gain in 559 of 560 triples. So: a bound about 1.7x the worst run, and the gain's sign
    # pooled over the 3 seeds.
    gains, kls, updates = [], [], []
    for seed in (0, 1, 2):
        h = run(seed, tmp_path).history
        assert len(h) == ITERATIONS
        reward = [s["reward"] for s in h]
        gains.append(statistics.mean(reward[-4:]) - statistics.mean(reward[:4]))
        kls.append(max(s["kl"] for s in h))
        updates += [s["updates"] for s in h]
    assert max(kls) < 12.0, kls
    assert statistics.mean(gains) > 0.0, gains
    assert min(updates) < 8 <= max(updates)  # target_kl stopped some iterations early, not all
    assert {
        "reward",
        "kl",
        "kl_coef",
        "entropy",
        "clip_frac",
        "approx_kl",
        "value_loss",
        "explained_variance",
        "early_stop",
    } <= set(h[0])


def test_only_the_adapter_and_value_head_train_and_the_reference_is_the_frozen_base(tmp_path):
    L.seed_everything(0)
    model = _ppo(
        Backbone(pretrained=False),
        num_rollouts=8,
        chunk_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        max_new_tokens=6,
        target_kl=None,
    )
    model.configure_model()  # before a loader draws its seed from the RNG: the same base as `fresh` below
    dm = PromptData(batch_size=8, synthetic_size=16, max_length=32)
    dm.setup()
    probe = next(iter(dm.val_dataloader()))
    ro = model.rollout(probe["input_ids"][:4], probe["attention_mask"][:4], probe["prompts"][:4])
    assert torch.allclose(ro.logprobs, ro.ref_logprobs, atol=1e-5)  # LoRA starts at zero: policy == base
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    _fit(model, dm, tmp_path, iterations=2)
    assert [s["updates"] for s in model.history] == [4.0, 4.0]
    for n, p in model.named_parameters():
        assert (not torch.equal(params[n], p.detach())) == ("lora_" in n or n.startswith("value_head.")), n
    # the reference log-probs of the same tokens are those of a fresh base, after training too
    L.seed_everything(0)
    fresh = _ppo(Backbone(pretrained=False))
    fresh.configure_model()
    args = (ro.seq, ro.mask, ro.responses, ro.prompt_len)
    m = ro.response_mask.bool()
    with torch.no_grad():
        with model.reference():
            ref_now = response_logprobs(model.model, *args)["logprobs"]
        base = response_logprobs(fresh.model, *args)["logprobs"]
        policy_now = response_logprobs(model.model, *args)["logprobs"]
    assert torch.allclose(ref_now[m], ro.ref_logprobs[m], atol=1e-5)
    assert torch.allclose(ref_now[m], base[m], atol=1e-5)
    assert not torch.allclose(policy_now[m], ro.logprobs[m], atol=1e-3)


def test_seeded_runs_are_identical(tmp_path):
    runs = [
        run(
            0,
            tmp_path,
            iterations=2,
            num_rollouts=8,
            chunk_size=8,
            mini_batch_size=4,
            ppo_epochs=2,
            max_new_tokens=8,
        ).history
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_rollout_log_probs_match_generation_with_left_padding():
    # GPT-2 has absolute positions: left-padded prompts must be numbered as generate() numbers them.
    L.seed_everything(0)
    model = PPO(
        Backbone("tiny-gpt2", pretrained=False),
        LoRA(rank=2, targets=["c_attn"]),
        reward_fn="ftlab.rewards.char_fraction",
        num_rollouts=4,
        max_new_tokens=6,
    )
    model.configure_model()
    tok = model.tokenizer
    tok.padding_side = "left"
    batch = tok(["a", "a much longer prompt", "hi", "xyz"], return_tensors="pt", padding=True)
    torch.manual_seed(3)
    ro = model.rollout(batch["input_ids"], batch["attention_mask"], ["a"] * 4)
    torch.manual_seed(3)
    model.eval()  # as in the rollout: GPT-2's dropout would change the sampled tokens
    out = model.model.generate(
        **batch,
        max_new_tokens=6,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        output_logits=True,
        return_dict_in_generate=True,
        **model.generation_kwargs,
    )
    assert torch.equal(out.sequences[:, batch["input_ids"].size(1) :], ro.responses)
    generated = (
        torch.log_softmax(torch.stack(out.logits, 1), -1).gather(-1, ro.responses.unsqueeze(-1)).squeeze(-1)
    )
    m = ro.response_mask.bool()
    assert torch.allclose(generated[m], ro.logprobs[m], atol=1e-4)


def test_reward_model_checkpoint_scores_as_its_training_data_encodes(tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(Backbone(), LoRA(rank=2))
    rm.configure_model()
    torch.nn.init.normal_(rm.head[1].weight)
    path = rm.save_adapter(tmp_path / "rm")
    model = PPO(Backbone(), LoRA(rank=2), reward_model=str(path), chunk_size=2)
    model.configure_model()
    rm_loaded = model.rewards.sources[0]["model"]
    assert rm_loaded is not None and not any(
        m is rm_loaded for m in model.modules()
    )  # not trained, not saved
    prompts, responses = ["Twice fen is", "hira in capitals is", "42 + 17 ="], [" fen fen.", "HIRA.", " 59"]
    scores, _ = model.rewards(prompts, responses)
    data = PreferenceData(max_length=64)
    rm.eval()
    with torch.no_grad():
        for p, r, s in zip(prompts, responses, scores):
            ids = torch.tensor(
                [data._ids(p, r.strip())[0]]
            )  # PreferenceData strips responses when it reads rows
            assert s.item() == pytest.approx(rm(ids, torch.ones_like(ids)).item(), abs=1e-5)


# ------------------------------------------------------------------ bad input
def test_reward_model_with_another_tokenizer_is_refused(tmp_path):
    folder = tmp_path / "minilm_rm"
    folder.mkdir()
    (folder / io.CONFIG).write_text(
        json.dumps(
            {
                "format": "ftlab-adapter",
                "method": "ftlab.peft.lora.LoRA",
                "init_args": {},
                "base": {"name_or_path": "minilm"},
                "extra": {"objective": "ftlab.objectives.reward_model.RewardModel"},
            }
        )
    )
    model = PPO(Backbone(pretrained=False), LoRA(rank=2), reward_model=str(folder))
    with pytest.raises(
        ValueError, match="reward model's tokenizer .*minilm.* differs from the policy's .*tiny-llama"
    ):
        model.configure_model()
    (folder / io.CONFIG).write_text(
        json.dumps(
            {
                "format": "ftlab-adapter",
                "base": {"name_or_path": "tiny-llama"},
                "extra": {"objective": "ftlab.objectives.causal_lm.CausalLM"},
            }
        )
    )
    with pytest.raises(ValueError, match="not a RewardModel"):
        PPO(Backbone(pretrained=False), LoRA(rank=2), reward_model=str(folder)).configure_model()


def test_prompts_longer_than_the_context_leaves_room_for():
    small = Backbone(pretrained=False, config_overrides={"max_position_embeddings": 64})
    with pytest.raises(
        ValueError, match="prompts of 48 tokens plus max_new_tokens=32 exceed tiny-llama's 64 positions"
    ):
        PPO(
            small, LoRA(rank=2), reward_fn="ftlab.rewards.has_char", max_length=48, max_new_tokens=32
        ).configure_model()
    model = PPO(small, LoRA(rank=2), reward_fn="ftlab.rewards.has_char", max_new_tokens=32)
    model.configure_model()
    ids = torch.full((1, 40), 97)
    with pytest.raises(ValueError, match="prompts of 40 tokens plus max_new_tokens=32 exceed"):
        model.rollout(ids, torch.ones_like(ids), ["a" * 40])


def test_other_mistakes_are_clear_errors():
    with pytest.raises(ValueError, match="reward_fn or reward_model, not both"):
        PPO(reward_fn="ftlab.rewards.has_char", reward_model="somewhere")
    with pytest.raises(ValueError, match="PPO needs a reward"):
        PPO()
    with pytest.raises(ValueError, match="cannot be imported"):
        PPO(reward_fn="ftlab.rewards.no_such_reward")
    with pytest.raises(ValueError, match="Full cannot do"):
        PPO(Backbone(pretrained=False), Full(), reward_fn="ftlab.rewards.has_char").configure_model()
    model = PPO(Backbone(pretrained=False), LoRA(rank=2), reward_fn="tests.objectives.test_ppo.one_score")
    with pytest.raises(ValueError, match="returned 1 scores for 2 responses"):
        model.rewards(["a", "b"], ["c", "d"])


def one_score(prompts, responses):
    return [1.0]
