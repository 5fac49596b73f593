"""Speed and memory at scale (issue 14), each comparison measured side by side in one run:

    python benchmarks/bench_speed.py                     # CPU: packing, chunked CE, FSDP2 loading
    python benchmarks/bench_speed.py --only packing      # one of: packing, chunked, fsdp
    python benchmarks/bench_speed.py --device cuda --hidden 2048 --layers 16 --fsdp-hidden 4096

1. packing: real (non-pad) training tokens per second, padded batches vs packed rows, on the real
   length distribution of the Alpaca 5k subset (``--alpaca``; byte-level tokens, ``--max-length``
   1024), ``tiny-llama`` scaled to ~18M parameters, LoRA r=16 on every linear layer, AdamW;
   batches of 16 padded samples vs 8 packed rows (about the same real tokens: ~2 samples a row).
   The two run alternately, one step each, from their own training orders; the number is all real
   tokens over all measured time of each (and the median step's), so long and short batches count
   as they train.
2. chunked: peak memory and step time, ``CausalLM(chunked_loss=False)`` (plain logits) vs the
   chunked loss, at a 128,256-token vocabulary (Llama 3's). "loss part": the head + loss + their
   backward alone, from given hidden states (frozen head, as under LoRA); "step": a whole LoRA
   training step of a small model with that vocabulary. Memory and time run in separate
   subprocesses: memory with glibc's mmap threshold pinned (tensors over 128 KiB go back to the OS
   when freed, so the resident set follows live tensors) and ``VmHWM`` reset just before the
   measured part (``/proc/self/clear_refs``), minus the resident set at that moment; time with
   default settings, the configurations alternating ``--repeats`` times (median). On CUDA:
   ``torch.cuda.max_memory_allocated`` above the allocation before the part.
3. fsdp: host memory per rank of ``CausalLM.configure_model`` under FSDP2 on 2 processes (gloo, or
   NCCL with ``--device cuda`` and 2 GPUs), loading a saved checkpoint of a few hundred MB:
   every rank loading it whole then sharding (ftlab before issue 14) vs built empty, sharded, then
   each rank reading its rows. Peak resident set (``VmHWM``) per rank, and the same minus the
   resident set after imports; both runs' loss on one batch is printed (they must agree).

The machine is usually shared: prefer the ratios (measured alternately) to absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.abspath(__file__)
ROOT = Path(HERE).parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_5000_subset" / "alpaca_5000.json"
PIN_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: VmHWM := VmRSS
        f.write("5")


def _llama(hidden: int, layers: int, **extra) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=4096,
        **extra,
    )


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------- packing
def packing(args) -> None:
    import torch

    from ftlab.data import InstructionData
    from ftlab.data.packing import efficiency
    from ftlab.models.backbone import Backbone
    from ftlab.objectives import CausalLM
    from ftlab.peft import LoRA

    if not Path(args.alpaca).exists():
        sys.exit(f"packing: {args.alpaca} is missing (the Alpaca 5k subset; pass --alpaca PATH)")
    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    data = {}
    for name, packed, batch in (("padded", False, args.padded_batch), ("packed", True, args.rows)):
        dm = InstructionData(
            source=str(args.alpaca),
            max_length=args.max_length,
            batch_size=batch,
            packing=packed,
            val_fraction=0.0,
        )
        dm.setup("fit")
        data[name] = iter(dm.train_dataloader())
        if packed:
            print(f"packed rows: {100 * efficiency(dm.splits['train'], args.max_length):.1f}% real tokens")
    torch.manual_seed(0)
    model = CausalLM(
        Backbone(
            "tiny-llama", pretrained=False, dtype=dtype, config_overrides=_llama(args.hidden, args.layers)
        ),
        LoRA(rank=16, alpha=32, targets=["all-linear"]),
        exact_match=False,
    )
    model.configure_model()
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch) -> tuple[int, float, float]:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        _sync(device)
        t0 = time.perf_counter()
        loss = model._loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        real = int(batch["attention_mask"].sum())
        return real, time.perf_counter() - t0, real / batch["attention_mask"].numel()

    runs: dict[str, list[tuple[int, float, float]]] = {"padded": [], "packed": []}
    for i in range(args.warmup + args.steps):
        for name in ("padded", "packed") if i % 2 == 0 else ("packed", "padded"):
            result = step(next(data[name]))
            if i >= args.warmup:
                runs[name].append(result)
    print(
        f"\n## Packing: Alpaca 5k lengths, max_length {args.max_length}, tiny-llama {params / 1e6:.1f}M "
        f"params, LoRA r=16 all linear, {device.type} {dtype}, {torch.get_num_threads()} threads, "
        f"{args.steps} steps each"
    )
    rate = {}
    for name, rows in runs.items():
        tokens, seconds = sum(r[0] for r in rows), sum(r[1] for r in rows)
        rate[name] = tokens / seconds
        median = statistics.median(r[0] / r[1] for r in rows)
        fill = statistics.median(r[2] for r in rows)
        print(
            f"  {name:<7} {rate[name]:9.0f} real tokens/s (median step {median:9.0f})  real/row tokens "
            f"{fill:.2f}  ({len(rows)} steps, {tokens} tokens, {seconds:.1f} s)"
        )
    print(f"  packed / padded: {rate['packed'] / rate['padded']:.2f}x real tokens/s (target >= 1.5x)")


# ----------------------------------------------------------------------------------- chunked
def chunked_worker(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    from ftlab.losses.chunked import chunked_lm_loss
    from ftlab.losses.lm import IGNORE, masked_lm_loss
    from ftlab.models.backbone import Backbone
    from ftlab.objectives import CausalLM
    from ftlab.peft import LoRA

    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)
    labels[:, : cfg["seq"] // 4] = IGNORE  # a prompt
    labels = labels.to(device)
    if cfg["part"] == "loss":
        weight = (torch.randn(cfg["vocab"], cfg["hidden"], generator=g) * 0.02).to(device, dtype)  # frozen
        hidden = torch.randn(cfg["batch"], cfg["seq"], cfg["hidden"], generator=g).to(device, dtype)

        def run():
            h = hidden.detach().requires_grad_()
            if cfg["mode"] == "chunked":
                loss = chunked_lm_loss(h, weight, labels)
            else:
                loss = masked_lm_loss(torch.nn.functional.linear(h, weight), labels)
            loss.backward()
    else:
        torch.manual_seed(0)
        overrides = _llama(cfg["hidden"], cfg["layers"], vocab_size=cfg["vocab"])
        backbone = Backbone("tiny-llama", pretrained=False, dtype=cfg["dtype"], config_overrides=overrides)
        module = CausalLM(
            backbone,
            LoRA(rank=16, targets=["q_proj", "v_proj"]),
            exact_match=False,
            chunked_loss=cfg["mode"] == "chunked",
        )
        module.configure_model()
        module.to(device).train()
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        ids = labels.clamp_min(0)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

        def run():
            module._loss(batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    run()  # warm-up: optimizer state, allocator
    _sync(device)
    if cfg["measure"] == "memory":
        if device.type == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run()
            return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
        base = _status_kib("VmRSS")
        _reset_peak()
        run()
        return {"peak_mib": (_status_kib("VmHWM") - base) / 1024}
    times = []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times)}


def _subprocess(kind: str, cfg: dict, env: dict | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, HERE, "--worker", kind, json.dumps(cfg)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{kind} worker failed ({cfg}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def chunked(args) -> None:
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    common = dict(
        device=args.device, dtype=dtype, threads=args.threads, vocab=args.vocab, steps=args.chunk_steps
    )
    parts = {
        "loss": dict(hidden=args.hidden, batch=args.batch, seq=args.seq, layers=0),
        "step": dict(hidden=args.chunk_hidden, batch=args.batch, seq=args.seq, layers=args.chunk_layers),
    }
    print(
        f"\n## Chunked cross-entropy: vocabulary {args.vocab}, batch {args.batch} x {args.seq} "
        f"({3 * args.seq // 4} labelled positions per row), {args.device} {dtype}, {args.threads} threads"
    )
    for part, shape in parts.items():
        cfg = {**common, **shape, "part": part}
        pin = PIN_MALLOC if args.device == "cpu" else None
        mem = {
            m: _subprocess("chunked", {**cfg, "mode": m, "measure": "memory"}, pin)["peak_mib"]
            for m in ("plain", "chunked")
        }
        times: dict[str, list[float]] = {"plain": [], "chunked": []}
        for r in range(args.repeats):
            for m in ("plain", "chunked") if r % 2 == 0 else ("chunked", "plain"):
                times[m].append(_subprocess("chunked", {**cfg, "mode": m, "measure": "time"})["step_s"])
        t = {m: statistics.median(v) for m, v in times.items()}
        what = (
            f"head + loss + backward, hidden {args.hidden}"
            if part == "loss"
            else f"LoRA step, tiny-llama hidden {args.chunk_hidden} x {args.chunk_layers} layers"
        )
        print(f"  {part} ({what}):")
        for m in ("plain", "chunked"):
            print(
                f"    {m:<8} peak {mem[m]:9.1f} MiB   time {t[m]:7.3f} s  (median of {args.repeats}: "
                f"{', '.join(f'{x:.3f}' for x in times[m])})"
            )
        print(
            f"    chunked / plain: peak memory {mem['chunked'] / mem['plain']:.2f}x (target <= 0.5x), "
            f"time {t['chunked'] / t['plain']:.2f}x (target <= 1.1x)"
        )


# ----------------------------------------------------------------------------------- fsdp
def fsdp_worker(cfg: dict) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(cfg["threads"])
    from ftlab.models.backbone import Backbone
    from ftlab.objectives import CausalLM
    from ftlab.peft import LoRA

    cuda = cfg["device"] == "cuda"
    rank = int(os.environ["RANK"])
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    mesh = init_device_mesh(
        "cuda" if cuda else "cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",)
    )
    if cfg["mode"] == "whole":  # ftlab before issue 14: every rank loads the whole checkpoint, then shards
        Backbone._build_empty = lambda self, *args: None
    base = _status_kib("VmRSS")
    _reset_peak()
    torch.manual_seed(0)
    module = CausalLM(Backbone(cfg["path"]), LoRA(rank=16, targets=["q_proj", "v_proj"]), exact_match=False)
    module._device_mesh = mesh
    module.configure_model()
    module.to(mesh.device_type)
    peak, after = _status_kib("VmHWM"), _status_kib("VmRSS")
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0)).to(mesh.device_type)
    with torch.no_grad():
        loss = float(module._loss({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}))
    dist.destroy_process_group()
    return {
        "rank": rank,
        "imports_mib": base / 1024,
        "peak_mib": peak / 1024,
        "after_mib": after / 1024,
        "loss": loss,
    }


def _fsdp_run(cfg: dict, port: int) -> list[dict]:
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            **PIN_MALLOC,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHONPATH": str(ROOT),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, HERE, "--worker", "fsdp", json.dumps(cfg)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if p.returncode or not lines:
            raise RuntimeError(f"fsdp worker failed ({cfg}):\n{stderr[-3000:]}")
        out.append(json.loads(lines[-1]))
    return out


def fsdp(args) -> None:
    import torch

    device = args.device
    if device == "cuda" and torch.cuda.device_count() < 2:
        print("\nfsdp: fewer than 2 GPUs, measuring host memory with gloo on the CPU")
        device = "cpu"
    folder = Path(args.workdir) / f"llama-{args.fsdp_hidden}x{args.fsdp_layers}"
    if not (folder / "model.safetensors").exists():
        from ftlab.models.backbone import Backbone
        from ftlab.models.tokenizer import byte_tokenizer

        torch.manual_seed(0)
        overrides = _llama(args.fsdp_hidden, args.fsdp_layers)
        model = Backbone("tiny-llama", pretrained=False, config_overrides=overrides).load("causal_lm")
        model.save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    cfg = dict(path=str(folder), device=device, threads=args.threads)
    runs: dict[str, list[dict]] = {"whole": [], "sharded": []}
    for r in range(args.repeats):
        for mode in ("whole", "sharded") if r % 2 == 0 else ("sharded", "whole"):
            runs[mode] += _fsdp_run({**cfg, "mode": mode}, 29500 + 2 * r + (mode == "sharded"))
    print(
        f"\n## FSDP2 loading: checkpoint {size:.0f} MiB (fp32, hidden {args.fsdp_hidden} x "
        f"{args.fsdp_layers} layers), 2 ranks ({'nccl' if device == 'cuda' else 'gloo'}), {args.repeats} "
        "runs each, per rank:"
    )
    peak, over = {}, {}
    for mode, rows in runs.items():
        peak[mode] = statistics.median(r["peak_mib"] for r in rows)
        over[mode] = statistics.median(r["peak_mib"] - r["imports_mib"] for r in rows)
        losses = sorted({round(r["loss"], 5) for r in rows})
        print(
            f"  {mode:<8} peak RSS {peak[mode]:7.0f} MiB, above imports {over[mode]:7.0f} MiB, after load "
            f"{statistics.median(r['after_mib'] for r in rows):7.0f} MiB; loss on one batch {losses}"
        )
    print(
        f"  sharded / whole: peak RSS {peak['sharded'] / peak['whole']:.2f}x (target <= 0.6x), "
        f"above imports {over['sharded'] / over['whole']:.2f}x"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["packing", "chunked", "fsdp"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--steps", type=int, default=4, help="packing: measured steps per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="alternating subprocess runs per configuration")
    p.add_argument("--alpaca", default=str(ALPACA))
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512, help="packing model and chunked loss part: hidden size")
    p.add_argument("--layers", type=int, default=8, help="packing model: blocks")
    p.add_argument("--padded-batch", type=int, default=16, help="packing: samples per padded batch")
    p.add_argument("--rows", type=int, default=8, help="packing: rows per packed batch (~2 samples a row)")
    p.add_argument("--batch", type=int, default=4, help="chunked: rows per batch")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=512, help="chunked: positions per row")
    p.add_argument("--chunk-steps", type=int, default=3, help="chunked: timed steps per subprocess (median)")
    p.add_argument("--chunk-hidden", type=int, default=256)
    p.add_argument("--chunk-layers", type=int, default=2)
    p.add_argument("--fsdp-hidden", type=int, default=1024)
    p.add_argument("--fsdp-layers", type=int, default=12)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ftlab_bench_speed"))
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, cfg = args.worker
        print(json.dumps({"chunked": chunked_worker, "fsdp": fsdp_worker}[kind](json.loads(cfg))))
        return
    import torch

    torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={args.threads} cpus={os.cpu_count()} torch={torch.__version__}")
    for name, run in (("packing", packing), ("chunked", chunked), ("fsdp", fsdp)):
        if args.only in (None, name):
            run(args)


if __name__ == "__main__":
    main()
