"""LoRA on the runner, for every task, as real CLI processes on a tiny model (the adapter itself is proven against
`peft` in nbs/06a_lora.ipynb).

- classification under `torchrun`: 2 CPU ranks compute what 1 process with 2 accumulation steps does, both stages;
  only the adapters and the head train, hold optimiser state and are saved; `gpt2-lora merge` writes a dense
  classifier that computes what the adapters on their base do;
- pretraining and SFT: a run stopped by `--time-limit` and resumed ends exactly where an uninterrupted one does;
  the merged SFT model opens as any checkpoint and exports to Hugging Face;
- bad input: one line each, exit status 2."""
import json, shutil, subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2_demo.checkpoint import load_checkpoint, open_model, read_config, save_checkpoint
from gpt2_demo.lora import lora_of
from gpt2_demo.model import DummyGPT, get_config
from test_tasks import ENV, MODULES, PY, args, data, histories   # noqa: F401 (`data` is a fixture)

LORA = ["--lora-rank", "4", "--lora-alpha", "8"]


def cli(module: str, *argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", module, *map(str, argv)], capture_output=True, text=True, env=ENV, timeout=timeout)


def adapter_numbers(model, rank: int = 4) -> int:
    "r·(in + out) for each adapted layer: qkv, out_proj, fc, proj of every block."
    d, L = model.cfg.emb_dim, model.cfg.n_layers
    return rank * L * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))


def test_classify_two_ranks_adapters_only_and_merge(tmp_path, data):
    single = cli(MODULES["classify"], *args("classify", data, tmp_path, "single", "--grad-accum", "2", *LORA))
    assert single.returncode == 0, single.stderr[-3000:]
    assert "LoRA rank 4, alpha 8 on qkv,out_proj,fc,proj" in single.stdout
    assert "AdamW lr 0.0003" in single.stdout and "Muon" not in single.stdout   # Muon is not given the adapters
    ddp = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          MODULES["classify"], *args("classify", data, tmp_path, "ddp", *LORA)],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    runs = tmp_path / "model"
    for h1, h2 in zip(histories("classify", runs / "single"), histories("classify", runs / "ddp")):
        for key in h1:
            assert [r[:2] for r in h1[key]] == [r[:2] for r in h2[key]], key
            assert max(abs(a[2] - b[2]) for a, b in zip(h1[key], h2[key])) <= 1e-5, key
        assert h1["train"][0][2] != h1["train"][-1][2]

    base = load_checkpoint(data["zh"])
    newest = lambda d: max(d.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for ck, head in ((newest(runs / "single" / "adapt"), False), (newest(runs / "single"), True)):
        cfg = read_config(ck)
        assert cfg["kind"] == "lora" and cfg["base"]["path"] == str(Path(data["zh"]).resolve())
        files = load_file(str(ck / "model.safetensors"))
        prefix = "body." if head else ""
        adapters = {k for k in files if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
        assert set(files) - adapters == ({"head.weight", "head.bias"} if head else set())
        assert sum(files[k].numel() for k in adapters) == adapter_numbers(base)
        assert all(k.startswith(prefix + "trf_blocks.") for k in adapters)
        state = torch.load(ck / "train_state.pt", weights_only=True)["optimizer"]
        assert len(state["state"]) == len(files)                   # optimiser state for exactly what trains

    summary = json.loads((runs / "single" / "summary.json").read_text())
    merged = cli("gpt2_demo.lora", "merge", runs / "single")
    assert merged.returncode == 0, merged.stderr[-2000:]
    dense, adapted = load_checkpoint(runs / "single" / "merged"), load_checkpoint(runs / "single" / "best")
    assert read_config(runs / "single" / "merged")["kind"] == "classifier" and lora_of(dense) is None
    assert lora_of(adapted) is not None
    x = torch.randint(0, base.cfg.vocab_size, (3, 20))
    lengths = torch.tensor([20, 11, 5])
    want, got = adapted(x, lengths), dense(x, lengths)
    assert (want - got).abs().max() <= 1e-5 * want.abs().max() + 1e-6              # fp32 rounding
    assert summary["results"]["pretrained"]["val_accuracy"] >= 0


@pytest.mark.parametrize("task", ["pretrain", "sft"])
def test_resume_after_time_limit_is_exact(tmp_path, data, task):
    extra = LORA
    if task == "pretrain":                                       # a pretrained model of the corpus's tokenizer
        torch.manual_seed(0)
        save_checkpoint(DummyGPT(get_config("tiny", context_len=32)), tmp_path / "base")
        extra = [*LORA, "--init-from", tmp_path / "base", "--no-compact-vocab"]
    straight = cli(MODULES[task], *args(task, data, tmp_path, "straight", *extra))
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = cli(MODULES[task], *args(task, data, tmp_path, "cut", *extra, "--time-limit", "1e-9"))
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert "time limit" in cut.stdout + cut.stderr
    resumed = cli(MODULES[task], "--resume", "--run-name", "cut", "--out-dir", tmp_path / "model", "--log-dir",
                  tmp_path / "log", "--no-progress", *(["--data-dir", tmp_path / "datasets"] if task == "pretrain" else []))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, = histories(task, tmp_path / "model" / "straight")
    b, = histories(task, tmp_path / "model" / "cut")
    assert a["train"] == b["train"] and a["val"][-1] == b["val"][-1]            # exactly the uninterrupted run
    assert b["val"][0][0] == 1                                   # (the cut run also evaluated where it stopped)
    assert a["train"][0][2] != a["train"][-1][2]
    last = tmp_path / "model" / "straight" / "step-000012" if task == "pretrain" else \
        tmp_path / "model" / "straight" / "step-000006"
    assert read_config(last)["kind"] == "lora"
    if task == "sft":                                             # the chat tokens' rows: stored, the rest is the base's
        files, V = load_file(str(last / "model.safetensors")), load_checkpoint(data["zh"]).cfg.vocab_size
        assert {k for k in files if "lora_" not in k} == {f"tok_emb.weight[{V}:]", f"out_head.weight[{V}:]"}
        out = cli("gpt2_demo.lora", "merge", last, "--out", tmp_path / "merged")
        assert out.returncode == 0, out.stderr[-2000:]
        dense, where = open_model(tmp_path / "merged")
        adapted = load_checkpoint(last)
        x = torch.randint(0, dense.cfg.vocab_size, (2, 16))
        want = adapted(x)
        assert (dense(x) - want).abs().max() <= 1e-5 * want.abs().max()
        from gpt2_demo.hf import to_hf
        assert (to_hf(dense)(input_ids=x).logits - want).abs().max() <= 1e-4 * want.abs().max()


def test_bad_input_one_line(tmp_path, data):
    def fails(module, *argv, says):
        r = cli(module, *argv)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, (argv, r.stdout[-500:], r.stderr[-2000:])
    own = lambda task, run, *extra: args(task, data, tmp_path, run, *extra)
    fails(MODULES["sft"], *own("sft", "r0", "--lora-rank", "0"), says="--lora-rank must be a positive integer")
    fails(MODULES["sft"], *own("sft", "big", "--lora-rank", "999"), says="--lora-rank 999 is larger than layer qkv")
    fails(MODULES["sft"], *own("sft", "tgt", "--lora-rank", "2", "--lora-targets", "att,mlp"), says="unknown layer 'mlp'")
    fails(MODULES["sft"], *own("sft", "rand", "--lora-rank", "2", "--random-init"), says="--random-init and --lora-rank")
    fails(MODULES["classify"], *own("classify", "tb", "--lora-rank", "2", "--train-blocks", "1"),
          says="--train-blocks and --lora-rank exclude each other")
    fails(MODULES["pretrain"], *own("pretrain", "scratch", "--lora-rank", "2"), says="give --init-from MODEL")
    # adapters on a base that changed since: resume and merge refuse
    base = tmp_path / "base"
    shutil.copytree(data["zh"], base)
    ok = cli(MODULES["sft"], *args("sft", {**data, "zh": base}, tmp_path, "run", "--lora-rank", "2"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    m = load_checkpoint(base)
    with torch.no_grad(): m.final_norm.scale.mul_(1.01)
    save_checkpoint(m, base)
    fails("gpt2_demo.lora", "merge", tmp_path / "model" / "run", says="is not the one the adapters were trained on")
    fails(MODULES["sft"], "--resume", "--run-name", "run", "--out-dir", tmp_path / "model", "--no-progress",
          says="is not the one the adapters were trained on")
    shutil.rmtree(base)
    fails("gpt2_demo.lora", "merge", tmp_path / "model" / "run", says="is missing")
    fails("gpt2_demo.lora", "merge", data["zh"], says="nothing to merge")
    fails("gpt2_demo.lora", "merge", tmp_path / "nowhere", says="no such folder")
