"""Methods side by side, step time and peak memory: LoRA vs QLoRA and DoRA (ftlab and PEFT) on one model,
S²-Attn vs full attention at a long sequence, and PiSSA's one-off initialisation.

    python benchmarks/bench_methods.py                      # CPU, default sizes, every comparison
    python benchmarks/bench_methods.py --only dora           # one comparison: quant, dora, attn or pissa
    python benchmarks/bench_methods.py --device cuda --hidden 2048 --layers 8 --batch 8 --seq 1024 \\
        --long-seq 16384 --group 4096

Models are ``tiny-llama`` scaled with ``Backbone(config_overrides=...)`` (random init: speed and
memory do not depend on the weights). A step is forward + backward + AdamW on the trainable
parameters; the first ``--warmup`` steps are not timed; the median of the rest is a run's step
time.

Each configuration runs in its own subprocesses, so peaks do not leak between them, and time and
memory are measured in separate runs:

- time: default allocator settings; the two configurations of a comparison run alternately
  ``--repeats`` times and each keeps its fastest run (the least disturbed on a shared machine).
- CPU peak memory: one run of two steps with glibc's mmap threshold pinned
  (``MALLOC_MMAP_THRESHOLD_=131072``), so every tensor over 128 KiB gets its own mapping and goes
  back to the OS when freed, and the resident set follows the live tensors (with the default
  dynamic threshold, freed memory stays in the heap and peaks depend on allocation history; the
  pinned threshold costs page faults, hence the separate run). The number is the process's peak
  resident set (``VmHWM``) during the training steps only, minus the RSS after imports (torch,
  transformers, bitsandbytes: the same for every configuration): ``VmHWM`` is reset by writing
  ``5`` to ``/proc/self/clear_refs`` after the model is built (and, for QLoRA, quantized), so the
  dense weights that exist briefly before quantization do not count. Where ``clear_refs`` cannot
  be written, it is ``ru_maxrss`` of the whole process and the table says so. ``resident`` is the
  RSS after setup minus the RSS after imports: roughly the model.
- CUDA peak memory: ``torch.cuda.max_memory_allocated`` during the training steps (reset after setup).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


# ------------------------------------------------------------------------------------ worker
def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(cfg: dict) -> dict:
    import gc
    import resource

    import torch

    torch.set_num_threads(cfg["threads"])
    from ftlab.models.backbone import Backbone
    from ftlab.peft import DoRA, LongLoRA, LoRA, QLoRA
    from ftlab.peft.qlora import linear_weight_bytes

    try:  # imported by QLoRA only: import it for every configuration so the baselines match
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    device = torch.device(cfg["device"])
    gc.collect()
    rss_imports = _status_kib("VmRSS") or 0
    torch.manual_seed(0)
    overrides = dict(
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"],
        max_position_embeddings=max(cfg["seq"], 512),
    )
    model = Backbone("tiny-llama", pretrained=False, dtype=cfg["dtype"], config_overrides=overrides).load(
        "causal_lm"
    )
    params = sum(p.numel() for p in model.parameters())
    method = {
        "lora": lambda: LoRA(rank=cfg["rank"], alpha=2 * cfg["rank"], targets=["all-linear"]),
        "qlora": lambda: QLoRA(
            rank=cfg["rank"], alpha=2 * cfg["rank"], targets=["all-linear"], compute_dtype=cfg["dtype"]
        ),
        "dora": lambda: DoRA(rank=cfg["rank"], alpha=2 * cfg["rank"], targets=["all-linear"]),
        "peft-dora": lambda: _PeftDoRA(cfg["rank"]),
        "peft-qlora": lambda: _PeftQLoRA(cfg["rank"], cfg["dtype"]),
        "full-attn": lambda: LoRA(rank=cfg["rank"], targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "s2-attn": lambda: LongLoRA(
            rank=cfg["rank"],
            targets=["q_proj", "k_proj", "v_proj", "o_proj"],
            group_size=cfg["group"],
            train_embeddings=False,
            train_norms=False,
        ),
    }[cfg["method"]]()
    model = method.apply(model) or model  # PEFT wraps the model; ftlab's methods work in place
    model.to(device).train()
    weight_bytes = linear_weight_bytes(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (cfg["batch"], cfg["seq"]), generator=gen).to(device)
    gc.collect()
    rss_setup = _status_kib("VmRSS") or 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        setup_mib = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        peak_kind = "cuda max_memory_allocated"
    else:
        setup_mib = (rss_setup - rss_imports) / 1024
        peak_kind = "VmHWM during training" if _reset_peak_rss() else "ru_maxrss of the whole process"

    times = []
    for step in range(cfg["warmup"] + cfg["steps"]):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)

    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    elif peak_kind.startswith("VmHWM"):
        peak_mib = ((_status_kib("VmHWM") or 0) - rss_imports) / 1024
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_imports) / 1024
    return {
        "step_s": statistics.median(times),
        "peak_mib": peak_mib,
        "resident_mib": setup_mib,
        "peak_kind": peak_kind,
        "params": params,
        "linear_weight_mib": weight_bytes / 2**20,
        "tokens_per_s": cfg["batch"] * cfg["seq"] / statistics.median(times),
    }


class _PeftDoRA:
    """PEFT's DoRA on the same layers, for the side-by-side row."""

    def __init__(self, rank: int):
        self.rank = rank

    def apply(self, model):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(
            model,
            LoraConfig(r=self.rank, lora_alpha=2 * self.rank, target_modules="all-linear", use_dora=True),
        )


class _PeftQLoRA:
    """PEFT's QLoRA as its users build it: the model loaded in 4 bits by transformers
    (``BitsAndBytesConfig``: nf4, double quantization), then LoRA on every linear layer."""

    def __init__(self, rank: int, dtype: str):
        self.rank, self.dtype = rank, dtype

    def apply(self, model):
        import tempfile

        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, self.dtype),
        )
        place = {"device_map": {"": 0}} if torch.cuda.is_available() else {}
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=config, dtype=getattr(torch, self.dtype), **place
            )
        return get_peft_model(
            model, LoraConfig(r=self.rank, lora_alpha=2 * self.rank, target_modules="all-linear")
        )


def pissa_init_time(cfg: dict, repeats: int = 3) -> None:
    """Seconds to apply LoRA with ``init: pissa`` (an SVD per target) vs the default, in process."""
    import torch

    from ftlab.models.backbone import Backbone
    from ftlab.peft import LoRA

    torch.set_num_threads(cfg["threads"])
    overrides = dict(
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"],
    )
    seconds = {}
    for init in ("kaiming", "pissa", "olora"):
        times = []
        for _ in range(repeats):
            model = Backbone("tiny-llama", pretrained=False, config_overrides=overrides).load("causal_lm")
            t0 = time.perf_counter()
            LoRA(rank=cfg["rank"], targets=["all-linear"], init=init).apply(model)
            times.append(time.perf_counter() - t0)
        seconds[init] = statistics.median(times)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"\nLoRA initialisation on {params:.1f}M params, r={cfg['rank']}, all linear layers, median of "
        f"{repeats}:"
    )
    for init, s in seconds.items():
        print(f"  {init:<8} {s:8.3f} s  ({s / seconds['kaiming']:.1f}x kaiming)")


# ------------------------------------------------------------------------------------ driver
def run(cfg: dict, pin_malloc: bool = False) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(cfg["threads"]),
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    if pin_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    proc = subprocess.run(
        [sys.executable, HERE, "--worker", json.dumps(cfg)], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{cfg['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def compare(common: dict, shape: dict, methods: tuple[str, ...], repeats: int) -> dict[str, dict]:
    """Time runs alternately ``repeats`` times (fastest kept), then one memory run per configuration."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            runs[m].append(run({**common, **shape, "method": m}))
    rows = {m: dict(min(rs, key=lambda r: r["step_s"])) for m, rs in runs.items()}
    for m in methods:
        if common["device"] == "cuda":  # the allocator's own peak: the timing runs measured it already
            rows[m]["peak_mib"] = max(r["peak_mib"] for r in runs[m])
            continue
        mem = run({**common, **shape, "method": m, "warmup": 0, "steps": 2}, pin_malloc=True)
        rows[m].update(peak_mib=mem["peak_mib"], resident_mib=mem["resident_mib"], peak_kind=mem["peak_kind"])
    return rows


def table(title: str, rows: dict[str, dict], base: str) -> None:
    print(f"\n{title}")
    print(
        f"  {'config':<10} {'step s (median)':>16} {'tokens/s':>10} {'peak MiB':>10} {'resident MiB':>13} "
        f"{'linear W MiB':>13}"
    )
    for name, r in rows.items():
        print(
            f"  {name:<10} {r['step_s']:>16.3f} {r['tokens_per_s']:>10.0f} {r['peak_mib']:>10.0f} "
            f"{r['resident_mib']:>13.0f} {r['linear_weight_mib']:>13.1f}"
        )
    a = rows[base]
    for other, b in rows.items():
        if other != base:
            print(
                f"  {other}/{base}: step time {b['step_s'] / a['step_s']:.2f}x, peak memory "
                f"{b['peak_mib'] / a['peak_mib']:.2f}x, linear weights "
                f"{b['linear_weight_mib'] / a['linear_weight_mib']:.2f}x"
                f"   (peak = {a['peak_kind']})"
            )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32 on CPU, bf16 on CUDA"
    )
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--repeats", type=int, default=2, help="alternate timing runs per configuration (fastest kept)"
    )
    p.add_argument("--rank", type=int, default=16)
    # LoRA vs QLoRA: ~27M parameters (hidden 512, 8 blocks)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    # S²-Attn vs full attention: the default tiny-llama shape at a long sequence
    p.add_argument("--long-hidden", type=int, default=128)
    p.add_argument("--long-layers", type=int, default=2)
    p.add_argument("--long-seq", type=int, default=4096)
    p.add_argument("--group", type=int, default=1024, help="S²-Attn group size (paper: 1/4 of the sequence)")
    p.add_argument(
        "--only", choices=["quant", "dora", "attn", "pissa"], default=None, help="run one comparison"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    common = dict(
        device=args.device,
        threads=args.threads,
        dtype=dtype,
        steps=args.steps,
        warmup=args.warmup,
        rank=args.rank,
        group=args.group,
    )
    print(
        f"device={args.device} threads={args.threads} dtype={dtype} steps={args.steps} (+{args.warmup} "
        "warm-up)"
    )
    shape = dict(
        hidden=args.hidden,
        intermediate=args.intermediate,
        layers=args.layers,
        heads=args.heads,
        batch=args.batch,
        seq=args.seq,
    )
    for only, others, title in (
        ("quant", ("qlora", "peft-qlora"), "QLoRA (ftlab, PEFT)"),
        ("dora", ("dora", "peft-dora"), "DoRA (ftlab, PEFT)"),
    ):
        if args.only in (None, only):
            rows = compare(common, shape, ("lora", *others), args.repeats)
            table(
                f"LoRA vs {title} (r={args.rank}, all linear layers; {rows['lora']['params'] / 1e6:.1f}M "
                "params, "
                f"batch {args.batch} x {args.seq})",
                rows,
                "lora",
            )
    if args.only in (None, "pissa"):
        pissa_init_time({**common, **shape})
    if args.only in (None, "attn"):
        shape = dict(
            hidden=args.long_hidden,
            intermediate=3 * args.long_hidden,
            layers=args.long_layers,
            heads=4,
            batch=1,
            seq=args.long_seq,
        )
        rows = compare(common, shape, ("full-attn", "s2-attn"), args.repeats)
        table(
            f"S²-Attn (group {args.group}) vs full causal attention (SDPA), LoRA r={args.rank} on q,k,v,o; "
            f"{rows['full-attn']['params'] / 1e6:.1f}M params, 1 x {args.long_seq} tokens",
            rows,
            "full-attn",
        )


if __name__ == "__main__":
    main()
