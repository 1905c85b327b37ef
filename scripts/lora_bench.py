"""Seconds per training step and peak memory: full fine-tuning against LoRA at several ranks, one model.

Each configuration runs in its own process (so its peak resident memory is its own): the model from a checkpoint,
adapters if a rank is given, the runner's `Stepper` (AdamW; fp32 or bf16 as `--precision`), `--warmup` steps,
then `--steps` timed steps on fixed random token windows of `--batch` × `--context`.

    python scripts/lora_bench.py CHECKPOINT [--ranks 0 4 8 16] [--batch 32] [--context 128] [--precision auto]

Rank 0 is full fine-tuning. Prints one Markdown table row per configuration.
"""
import argparse, json, resource, subprocess, sys, time

ONE = r'''
import json, resource, sys, time, torch
from gpt2_demo.checkpoint import open_model
from gpt2_demo.lora import LoRAConfig, add_lora
from gpt2_demo.optim import Stepper, pick_precision
a = json.loads(sys.argv[1])
model, _ = open_model(a["checkpoint"])
model.train()
if a["rank"]: add_lora(model, LoRAConfig(a["rank"]))
T = min(a["context"], model.cfg.context_len)
prec = pick_precision(a["precision"], "cpu", model.cfg, a["batch"] * T)
st = Stepper(model, precision=prec, weight_decay=0.1, lr=1e-3)
g = torch.Generator().manual_seed(0)
x = torch.randint(0, model.cfg.vocab_size, (a["batch"], T + 1), generator=g)
batch = [(x[:, :-1], x[:, 1:])]
for _ in range(a["warmup"]): st.step(batch, 1e-4)
t0 = time.perf_counter()
for _ in range(a["steps"]): st.step(batch, 1e-4)
dt = (time.perf_counter() - t0) / a["steps"]
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(json.dumps(dict(rank=a["rank"], precision=prec, s_per_step=dt, trainable=trainable, params=model.num_params(),
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
'''


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--ranks", type=int, nargs="+", default=[0, 4, 8, 16])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--precision", default="auto")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    print("| fine-tuning | trainable numbers | s/step | peak memory |")
    print("|---|---:|---:|---:|")
    for r in a.ranks:
        args = dict(vars(a), rank=r)
        out = subprocess.run([sys.executable, "-c", ONE, json.dumps(args)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"rank {r}: {out.stderr.strip().splitlines()[-1]}")
        d = json.loads(out.stdout.strip().splitlines()[-1])
        what = "full" if r == 0 else f"LoRA r={r}"
        print(f"| {what} ({d['precision']}) | {d['trainable']:,} of {d['params']:,} | {d['s_per_step']:.3f} | "
              f"{d['peak_rss_mb'] / 1024:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
