"""One training step, side by side: ftlab LoRA vs PEFT LoRA vs full fine-tuning, and ftlab's
Lightning step vs a plain PyTorch loop. Prints medians and ratios measured in one run.

    python benchmarks/bench_lora.py                      # CPU: tiny-llama scaled to ~25M, and minilm
    python benchmarks/bench_lora.py --device cuda        # GPU: 1.1B Llama shape, bf16, seq 2048, batch 4
    python benchmarks/bench_lora.py --device cuda --compile       # ... plus a torch.compile'd ftlab LoRA
    python benchmarks/bench_lora.py --device cpu --gpu-table --tiny  # the GPU table's code, on CPU, tiny

Every configuration gets its own fresh model with the same seed, the same batch and AdamW; the
configurations are interleaved step by step on CPU so machine noise hits them alike. Step time
is forward + backward + optimizer step + zero_grad; the first ``--warmup`` steps are dropped.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F

from ftlab.models.backbone import Backbone
from ftlab.peft import LoRA

LLAMA_CPU = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8
)
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """A model, its optimizer and a loss closure: ``step()`` returns seconds for one step."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        loss_fn: Callable[[], torch.Tensor],
        device: torch.device,
        lr: float = 1e-4,
        fused: bool = False,
    ):
        self.name, self.model, self.loss_fn, self.device = name, model, loss_fn, device
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        kind = {"fused": True} if fused else {"foreach": device.type == "cuda"}
        self.opt = torch.optim.AdamW(params, lr=lr, **kind)
        self.times: list[float] = []

    def step(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        self.loss_fn().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        dt = time.perf_counter() - t0
        self.times.append(dt)
        return dt


def causal_loss(model, ids):
    return lambda: F.cross_entropy(
        model(input_ids=ids, use_cache=False).logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()
    )


def build_llama(overrides, dtype, device):
    torch.manual_seed(0)
    bb = Backbone("tiny-llama", pretrained=False, dtype=dtype, config_overrides=overrides)
    return bb, bb.load("causal_lm").to(device)


def peft_lora(model, rank, alpha, targets):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    )


# --------------------------------------------------------------------------------------- CPU
def lightning_step_times(module: L.LightningModule, batch: dict, steps: int) -> list[float]:
    """Per-step seconds of ``Trainer.fit`` on one repeated batch, timed batch start to batch end."""
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *a):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *a):
            times.append(time.perf_counter() - self.t0)

    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
    )
    trainer.fit(module, loader)
    return times


def cpu_llama(steps: int, warmup: int, batch: int, seq: int) -> None:
    from ftlab.objectives import CausalLM

    device = torch.device("cpu")
    ids = torch.randint(0, 256, (batch, seq))
    runners = []
    _, full = build_llama(LLAMA_CPU, "float32", device)
    runners.append(Runner("full fine-tuning", full, causal_loss(full, ids), device))
    _, m = build_llama(LLAMA_CPU, "float32", device)
    LoRA(rank=16, alpha=32, targets=ALL_LINEAR).apply(m)
    runners.append(Runner("ftlab LoRA", m, causal_loss(m, ids), device))
    _, base = build_llama(LLAMA_CPU, "float32", device)
    pm = peft_lora(base, 16, 32, ALL_LINEAR)
    runners.append(Runner("PEFT LoRA", pm, causal_loss(pm, ids), device))
    print(
        f"\n## CPU: Llama {sum(p.numel() for p in full.parameters()) / 1e6:.1f}M params, batch "
        f"{batch}x{seq}, "
        f"LoRA r=16 on all 7 projections, fp32, {torch.get_num_threads()} threads"
    )
    interleave(runners, steps + warmup)
    report(runners, warmup, batch * seq, baseline="PEFT LoRA")

    # Lightning vs a plain loop, same module class and loss
    torch.manual_seed(0)
    module = CausalLM(
        Backbone("tiny-llama", pretrained=False, config_overrides=LLAMA_CPU),
        LoRA(rank=16, alpha=32, targets=ALL_LINEAR),
        optimizer=torch.optim.AdamW,
        exact_match=False,
    )
    module.configure_model()
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain = Runner("plain loop (CausalLM)", module, lambda: module._loss(b), device, lr=1e-3)
    lightning_vs_plain(module, plain, b, steps, warmup)


def cpu_minilm(steps: int, warmup: int, batch: int, seq: int) -> None:
    from ftlab.objectives import SequenceClassifier

    device = torch.device("cpu")
    bb = Backbone("minilm")
    tok = bb.tokenizer()
    ids = torch.randint(1000, tok.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)

    def encoder():
        torch.manual_seed(0)
        return bb.load("encoder")

    def enc_loss(model):
        return lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state.float().pow(2).mean()

    full = encoder()
    m = encoder()
    LoRA(rank=8, alpha=16, targets=["query", "value"]).apply(m)
    pm = peft_lora(encoder(), 8, 16, ["query", "value"])
    runners = [
        Runner("full fine-tuning", full, enc_loss(full), device),
        Runner("ftlab LoRA", m, enc_loss(m), device),
        Runner("PEFT LoRA", pm, enc_loss(pm), device),
    ]
    print(f"\n## CPU: MiniLM-L6 (22.7M), batch {batch}x{seq}, LoRA r=8 on query,value, fp32")
    interleave(runners, steps + warmup)
    report(runners, warmup, batch * seq, baseline="PEFT LoRA")

    module = SequenceClassifier(
        bb, LoRA(rank=8, alpha=16, targets=["query", "value"]), num_labels=2, pooling="mean"
    )
    module.configure_model()
    b = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,))}
    plain = Runner(
        "plain loop (SequenceClassifier)",
        module,
        lambda: F.cross_entropy(module(b["input_ids"], b["attention_mask"]), b["labels"]),
        device,
        lr=1e-3,
    )
    lightning_vs_plain(module, plain, b, steps, warmup)


def lightning_vs_plain(module, plain: Runner, batch: dict, steps: int, warmup: int) -> None:
    """Alternate blocks of plain-loop steps and Lightning fits on the same module."""
    light: list[float] = []
    for _ in range(3):
        for _ in range(max(2, (steps + warmup) // 3)):
            plain.step()
        light += lightning_step_times(module, batch, max(2, (steps + warmup) // 3))[1:]
    p = statistics.median(plain.times[1:])
    q = statistics.median(light)
    print(
        f"  Lightning step {q * 1e3:8.1f} ms  vs plain loop {p * 1e3:8.1f} ms  ->  overhead {q / p:.3f}x "
        "(target <= 1.05x)"
    )


def interleave(runners: list[Runner], n: int) -> None:
    for _ in range(n):
        for r in runners:
            r.step()


def report(runners: list[Runner], warmup: int, tokens: int, baseline: str) -> None:
    base = statistics.median(next(r for r in runners if r.name == baseline).times[warmup:])
    for r in runners:
        med = statistics.median(r.times[warmup:])
        print(
            f"  {r.name:<18} median {med * 1e3:9.1f} ms  {tokens / med:10.0f} tok/s  "
            f"trainable {r.trainable / 1e6:8.2f}M  step time vs {baseline}: {med / base:.3f}x"
        )


# --------------------------------------------------------------------------------------- GPU
def device_run(
    name: str,
    build: Callable[[], torch.nn.Module],
    device: torch.device,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    vocab: int,
    fused: bool = False,
) -> dict:
    """One configuration on ``device``: median step and peak memory (CUDA allocator; NaN on CPU)."""
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    model = build()
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    r = Runner(name, model, causal_loss(model, ids), device, fused=fused)
    for _ in range(steps + warmup):
        r.step()
    med = statistics.median(r.times[warmup:])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    out = {
        "name": name,
        "tok_s": batch * seq / med,
        "peak_gib": peak,
        "step_ms": med * 1e3,
        "trainable_m": r.trainable / 1e6,
    }
    del r, model
    return out


def gpu(
    device: torch.device, steps: int, warmup: int, batch: int, seq: int, tiny: bool, compile_: bool
) -> None:
    """The side-by-side table on the 1.1B Llama shape (``tiny``: a small one, to run this code on CPU)."""
    shape = dict(LLAMA_CPU, vocab_size=32000) if tiny else LLAMA_1B
    dtype = "float32" if device.type == "cpu" else "bfloat16"

    def full():
        return build_llama(shape, dtype, device)[1]

    def ftlab_lora():
        m = full()
        LoRA(rank=16, alpha=32, targets=ALL_LINEAR).apply(m)
        return m

    def ftlab_lora_gc():
        m = ftlab_lora()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return m

    def ftlab_lora_compiled():
        m = ftlab_lora()
        for block in m.model.layers:
            block.compile()
        return m

    def peft():
        return peft_lora(full(), 16, 32, ALL_LINEAR)

    print(
        f"\n## {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}: Llama "
        f"{'tiny' if tiny else '1.1B'} shape, {dtype}, SDPA, batch {batch}x{seq}, LoRA r=16 on all 7 "
        "projections, AdamW"
    )
    configs = [
        ("full fine-tuning", full, False),
        ("PEFT LoRA", peft, False),
        ("ftlab LoRA", ftlab_lora, False),
        ("ftlab LoRA, fused AdamW", ftlab_lora, True),
        ("ftlab LoRA + grad ckpt", ftlab_lora_gc, False),
    ]
    if compile_:
        configs.append(("ftlab LoRA, compiled blocks", ftlab_lora_compiled, False))
    rows = [
        device_run(n, f, device, batch, seq, steps, warmup, shape["vocab_size"], fused)
        for n, f, fused in configs
    ]
    peft_row = next(r for r in rows if r["name"] == "PEFT LoRA")
    full_row = next(r for r in rows if r["name"] == "full fine-tuning")
    for r in rows:
        print(
            f"  {r['name']:<28} {r['tok_s']:9.0f} tok/s  {r['peak_gib']:6.1f} GiB  step "
            f"{r['step_ms']:7.1f} ms  "
            f"trainable {r['trainable_m']:7.2f}M  vs PEFT: {r['tok_s'] / peft_row['tok_s']:.2f}x tok/s, "
            f"{r['peak_gib'] / peft_row['peak_gib']:.2f}x memory; vs full: "
            f"{r['tok_s'] / full_row['tok_s']:.2f}x tok/s"
        )
    print("  targets: ftlab LoRA >= 2x PEFT tok/s at <= 0.75x PEFT memory, and >= 1.15x full fine-tuning")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", choices=["llama", "minilm"], default=None, help="CPU: run one model only")
    ap.add_argument("--gpu-table", action="store_true", help="the GPU table (default with --device cuda)")
    ap.add_argument("--tiny", action="store_true", help="the GPU table on a small Llama, batch 2 x 128")
    ap.add_argument("--compile", action="store_true", help="also time ftlab LoRA with torch.compile'd blocks")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.device == "cuda" or args.gpu_table:
        batch, seq = (2, 128) if args.tiny else (4, 2048)
        gpu(torch.device(args.device), args.steps or 10, args.warmup, batch, seq, args.tiny, args.compile)
        return
    steps = args.steps or 10
    if args.only in (None, "llama"):
        cpu_llama(steps, args.warmup, batch=8, seq=256)
    if args.only in (None, "minilm"):
        cpu_minilm(steps, args.warmup, batch=16, seq=128)


if __name__ == "__main__":
    main()
