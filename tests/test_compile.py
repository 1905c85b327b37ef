"""`torch.compile` of the training step: one graph (fullgraph=True), and the same losses as the eager step.

The GPU fast path compiles forward and loss together (`Stepper(compile=True)`); a graph break there would fail, so it
is checked here on the CPU with a tiny model, in fp32 and in bf16 with a padded vocabulary, and with LoRA adapters."""
import os, subprocess, sys

import pytest

CODE = r'''
import torch
from gpt2_demo.model import DummyGPT, get_config
from gpt2_demo.optim import Stepper
from gpt2_demo.lora import LoRAConfig, add_lora
torch.set_num_threads(1)
x, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
for precision, pad, lora in (("fp32", 1, False), ("bf16", 64, False), ("fp32", 1, True)):
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = DummyGPT(get_config("tiny"))
        if lora: add_lora(model, LoRAConfig(4, dropout=0.0))           # adapters only train: frozen weights in the graph
        st = Stepper(model, precision=precision, compile=compiled, pad_vocab_to=pad)
        losses[compiled] = [st.step([(x, y)], lr=1e-3)[0] for _ in range(3)]
    tol = 1e-4 if precision == "fp32" else 2e-2      # bf16: 8 significant bits, kernels fused differently
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True])) < tol, (precision, losses)
    print(precision, "lora" if lora else "", losses)
'''


def test_compiled_step_matches_eager():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("\n") == 3


DECODE = r'''
import torch
from gpt2_demo.model import DummyGPT, get_config
from gpt2_demo.generate import generate, decode_step, _decode_one
torch.set_num_threads(1)
torch.manual_seed(0)
m = DummyGPT(get_config("tiny")).eval()
p = torch.randint(0, 50257, (1, 7))
ref = generate(m, p, 20, static=False)
cache = m.new_cache(1, static=True)
with torch.no_grad():
    logits = m(p, cache, last_only=True, positions=torch.arange(7))[:, -1]
    step = torch.compile(_decode_one, fullgraph=True)     # the GPU path's step, compiled (no CUDA graphs on a CPU)
    toks, n = [], 7
    for _ in range(20):
        nxt = logits.argmax(-1)
        toks.append(int(nxt))
        logits = step(m, cache, nxt[:, None], torch.tensor([n]))
        n += 1
assert toks == ref[0, 7:].tolist(), (toks, ref[0, 7:].tolist())
print("ok")
'''


def test_compiled_static_decoding_matches_generate():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", DECODE], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
