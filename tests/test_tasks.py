"""Every task gets every runner capability: under `torchrun`, 2 CPU ranks compute what 1 process with 2 gradient
accumulation steps computes — for pretraining, classification (both its stages) and instruction tuning — and the
flags the runner owns (`--grad-accum`, `--time-budget`, `--optimizer muon`) work in every command.

(Each command's own test file kills a run with SIGKILL and checks that the resumed run ends exactly where an
uninterrupted one does.) Every run is a real CLI process on a tiny model and data written by the test."""
import json, os, subprocess, sys, tempfile
from pathlib import Path

import pytest
import torch

from gpt2_demo.checkpoint import save_checkpoint
from gpt2_demo.data import load_reviews
from gpt2_demo.model import DummyGPT, get_config
from gpt2_demo.tokenizer import ModelEncoding, get_tokenizer

PY = sys.executable
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
           GPT2_DEMO_CACHE=tempfile.mkdtemp(prefix="gpt2_demo-test-cache-"))
MODULES = {"pretrain": "gpt2_demo.train", "classify": "gpt2_demo.classify", "sft": "gpt2_demo.sft"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    "A small corpus, 300 short reviews with a tiny model over their ids, and 20 instructions with another."
    d = tmp_path_factory.mktemp("tasks")
    (d / "c.txt").write_text("\n\n".join(f"第{i}段：人民日报记者报道，今天的天气很好。The quick brown fox {i} jumps."
                                         for i in range(300)), encoding="utf-8")
    r = load_reviews()
    pairs = sorted(zip(r.texts, r.labels), key=lambda p: len(p[0]))[:9000:30]
    (d / "reviews.jsonl").write_text("".join(json.dumps({"text": t, "label": l}, ensure_ascii=False) + "\n"
                                             for t, l in pairs), encoding="utf-8")
    recs = [{"instruction": f"“{a}”的反义词是什么？", "output": b}
            for a, b in ["大小", "上下", "多少", "长短", "高低", "快慢", "前后", "左右", "开关", "新旧",
                         "冷热", "轻重", "远近", "早晚", "黑白", "东西", "南北", "买卖", "进出", "来去"]]
    (d / "sft.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in recs), encoding="utf-8")
    cl = get_tokenizer("cl100k_base")
    text = "".join(t for t, _ in pairs) + json.dumps(recs, ensure_ascii=False)
    torch.manual_seed(0)
    vocab = ModelEncoding(cl, sorted(set(cl.encode(text)))).ids.tolist()
    save_checkpoint(DummyGPT(get_config("tiny", tokenizer="cl100k_base", vocab_ids=vocab, context_len=32)), d / "zh")
    return dict(dir=d, corpus=d / "c.txt", reviews=d / "reviews.jsonl", sft=d / "sft.jsonl", zh=d / "zh")


def args(task: str, d: dict, tmp: Path, run: str, *extra) -> list:
    "Flags for a short deterministic run of `task` (no dropout, fp32) under `tmp`."
    common = ["--run-name", run, "--out-dir", tmp / "model", "--log-dir", tmp / "log", "--no-progress",
              "--precision", "fp32", "--drop-rate", "0", "--seed", "7", *extra]
    own = {"pretrain": ["--data", d["corpus"], "--tokenizer", "gpt2", "--preset", "tiny", "--context-len", "32",
                        "--batch-size", "4", "--max-steps", "12", "--warmup-steps", "2", "--eval-every", "6",
                        "--eval-batches", "2", "--save-every", "6", "--sample-tokens", "4", "--ngram-order", "2",
                        "--data-dir", tmp / "datasets"],
           "classify": ["--data", d["reviews"], "--init-from", d["zh"], "--batch-size", "8", "--max-steps", "6",
                        "--eval-every", "3", "--save-every", "3", "--adapt-epochs", "0.3", "--no-random-init"],
           "sft": ["--data", d["sft"], "--init-from", d["zh"], "--batch-size", "4", "--max-steps", "6",
                   "--eval-every", "3", "--save-every", "3", "--eval-examples", "4"]}[task]
    return [str(a) for a in own + common]


def histories(task: str, run: Path) -> list:
    "The training histories a run ends with: its final step checkpoint's (and, for classification, the adaptation's)."
    folders = [run, run / "adapt"] if task == "classify" else [run]
    out = []
    for f in folders:
        last = max(f.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        out.append(torch.load(last / "train_state.pt", weights_only=True)["history"])
    return out


@pytest.mark.parametrize("task", list(MODULES))
def test_two_ranks_match_two_accumulation_steps(tmp_path, data, task):
    single = subprocess.run([PY, "-m", MODULES[task], *args(task, data, tmp_path, "single", "--grad-accum", "2")],
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", MODULES[task],
                          *args(task, data, tmp_path, "ddp", "--grad-accum", "1")],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    compared = 0
    for h1, h2 in zip(histories(task, tmp_path / "model" / "single"), histories(task, tmp_path / "model" / "ddp")):
        assert h1.keys() == h2.keys()
        for key in h1:
            assert [r[:2] for r in h1[key]] == [r[:2] for r in h2[key]], key      # same steps, same tokens seen
            diffs = [abs(a[2] - b[2]) for a, b in zip(h1[key], h2[key])]
            assert max(diffs) <= 1e-5, (key, diffs)
            compared += len(diffs)
        assert h1["train"][0][2] != h1["train"][-1][2]                          # the weights really moved
    assert compared >= {"pretrain": 12, "classify": 10, "sft": 6}[task]
    report = {"pretrain": "val loss", "classify": "| classifier |", "sft": "exactly right"}[task]
    assert ddp.stdout.count(report) == 1 and single.stdout.count(report) == 1   # only rank 0 reports


def test_runner_flags_in_every_command(tmp_path, data):
    "--grad-accum with a --time-budget for classification, Muon for SFT: flags that once belonged to one command."
    r = subprocess.run([PY, "-m", MODULES["classify"], *args("classify", data, tmp_path, "budget", "--grad-accum", "2",
                                                             "--time-budget", "0.05", "--max-steps", "off",
                                                             "--adapt-epochs", "0")],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "model" / "budget" / "summary.json").read_text())
    assert s["settings"]["grad_accum"] == 2 and s["settings"]["time_budget"] == 0.05
    assert s["results"]["pretrained"]["steps"] >= 1 and s["train_minutes"]["pretrained"] >= 0.05
    assert "fine-tuning on cpu in fp32: 0.05 min of 2 × 8 texts" in r.stdout
    r = subprocess.run([PY, "-m", MODULES["sft"], *args("sft", data, tmp_path, "muon", "--optimizer", "muon",
                                                        "--muon-lr", "0.01", "--grad-accum", "2")],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Muon lr 0.01 + AdamW lr 0.001" in r.stdout
    state = torch.load(tmp_path / "model" / "muon" / "step-000006" / "train_state.pt", weights_only=True)
    assert len(state["optimizer"]["optimizers"]) == 2 and state["micro_per_step"] == 2   # AdamW + Muon, saved
