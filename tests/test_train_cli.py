"""End-to-end tests of `python -m gpt2_demo.train`: data sources, bad input, kill/resume, --init-from, --time-limit
(torchrun ≡ gradient accumulation, for every task: tests/test_tasks.py).

Every run here is a real CLI process on a tiny model and a small corpus written by the test itself."""
import json, os, signal, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
import pytest
import torch

PY = sys.executable
# one thread per process: tiny models run faster that way, and a busy 2-core machine does not slow them down by
# oversubscribing its cores (OpenMP threads spinning against each other)
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
           GPT2_DEMO_CACHE=tempfile.mkdtemp(prefix="gpt2_demo-test-cache-"))   # per-machine measurements: not in ~

PARAGRAPHS = [f"第{i}段：人民日报记者报道，今天的天气很好。The quick brown fox number {i} jumps over the lazy dog."
              for i in range(300)]


def tiny_args(tmp: Path, data, *extra, steps=20, run="r"):
    "Flags for a fast run: tiny preset, gpt2 tokenizer, everything under `tmp`."
    return ["--data", str(data), "--tokenizer", "gpt2", "--preset", "tiny", "--context-len", "32", "--batch-size", "4",
            "--max-steps", str(steps), "--warmup-steps", "2", "--eval-every", "10", "--eval-batches", "2",
            "--save-every", "10", "--sample-tokens", "4", "--run-name", run, "--out-dir", str(tmp / "model"),
            "--log-dir", str(tmp / "log"), "--data-dir", str(tmp / "datasets"), "--no-progress", "--ngram-order", "3", *extra]


def train(args, **kw):
    return subprocess.run([PY, "-m", "gpt2_demo.train", *args], capture_output=True, text=True, env=ENV, **kw)


def history(ckpt: Path) -> dict:
    return torch.load(ckpt / "train_state.pt", weights_only=True)["history"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    (d / "c.txt").write_text("\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    return d / "c.txt"


# ---- data sources --------------------------------------------------------------------------------------------

def write_source(d: Path, kind: str) -> Path:
    if kind == "txt-line":
        p = d / "line.txt"; p.write_text("\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    elif kind == "jsonl":
        p = d / "c.jsonl"; p.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in PARAGRAPHS), encoding="utf-8")
    elif kind == "json-array":   # the layout of wikipedia-cn-20230720-filtered.json
        p = d / "wiki.json"; p.write_text(json.dumps([{"completion": t, "source": "wikipedia"} for t in PARAGRAPHS], ensure_ascii=False), encoding="utf-8")
    elif kind == "parquet":
        import pyarrow as pa, pyarrow.parquet as pq
        p = d / "c.parquet"; pq.write_table(pa.table({"content": PARAGRAPHS, "id": list(range(len(PARAGRAPHS)))}), p)
    return p


@pytest.mark.parametrize("kind", ["txt-line", "jsonl", "json-array", "parquet"])
def test_data_sources_train(tmp_path, kind):
    src = write_source(tmp_path, kind)
    extra = ["--txt-docs", "line"] if kind == "txt-line" else []
    r = train(tiny_args(tmp_path, src, *extra, steps=10))
    assert r.returncode == 0, r.stderr
    meta = json.loads(next((tmp_path / "datasets" / "tokens").glob("*/meta.json")).read_text())
    assert sum(s["documents"] for s in meta["splits"].values()) == len(PARAGRAPHS)   # one document per record/line
    assert meta["text_field"] == {"txt-line": "text", "jsonl": "text", "json-array": "completion", "parquet": "content"}[kind]
    s = json.loads((tmp_path / "model" / "r" / "summary.json").read_text())
    assert s["steps"] == 10 and np.isfinite(s["val_loss"]) and np.isfinite(s["val_bits_per_char"])
    assert "val loss" in r.stdout and "unigram (no context)" in r.stdout and "Kneser-Ney 3-gram" in r.stdout


# ---- bad input: one line, exit status 2, no traceback, nothing left behind ------------------------------------

def bad_inputs(d: Path) -> dict:
    (d / "gbk.txt").write_bytes("开头是UTF-8，".encode() + "后面是GBK编码的中文".encode("gbk"))
    (d / "empty.jsonl").write_text("")
    (d / "blank.txt").write_text("\n\n  \n\n")
    (d / "short.txt").write_text("一篇很短的文章。\n\n另一篇。\n")
    (d / "fields.jsonl").write_text('{"title": "t", "body": "b"}\n' * 5)
    return {"missing file": ([str(d / "nope.txt")], "no such file"),
            "undecodable bytes": ([str(d / "gbk.txt")], "not valid UTF-8 at byte offset"),
            "empty file": ([str(d / "empty.jsonl")], "empty"),
            "empty corpus": ([str(d / "blank.txt")], "no text found"),
            "shorter than one window": ([str(d / "short.txt")], "fewer than one context window"),
            "missing text field": ([str(d / "fields.jsonl")], "fields found: title, body"),
            "bad setting": ([str(d / "short.txt"), "--lr", "-1"], "--lr must be a positive number"),
            "bad optimizer": ([str(d / "short.txt"), "--optimizer", "sgd"], "invalid choice: 'sgd'"),
            "bad Muon rate": ([str(d / "short.txt"), "--optimizer", "muon", "--muon-lr", "0"],
                              "--muon-lr must be a positive number"),
            "bad init": ([str(d / "short.txt"), "--init-from", str(d / "no-such-checkpoint")], "--init-from"),
            "hub offline": (["pleisto/wikipedia-cn-20230720-filtered", "--max-samples", "20000"], "cannot reach the Hugging Face hub")}


@pytest.mark.parametrize("case", list(bad_inputs(Path("/tmp")).keys()))
def test_bad_input(tmp_path, case):
    data, message = bad_inputs(tmp_path)[case]
    r = train(tiny_args(tmp_path, data[0], *data[1:]))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "model").exists() and not (tmp_path / "log").exists()
    tokens = tmp_path / "datasets" / "tokens"
    assert not tokens.exists() or not any(tokens.iterdir()), list(tokens.iterdir())


def test_existing_run_is_not_overwritten(tmp_path, corpus):
    assert train(tiny_args(tmp_path, corpus, steps=10)).returncode == 0
    r = train(tiny_args(tmp_path, corpus, steps=10))
    assert r.returncode == 2 and "already has checkpoints" in r.stderr and "--resume" in r.stderr


# ---- exact resume after SIGKILL -------------------------------------------------------------------------------

def test_sigkill_then_resume_matches_uninterrupted(tmp_path, corpus):
    steps, every = 600, 50
    args = lambda run: tiny_args(tmp_path, corpus, "--drop-rate", "0.1", "--eval-every", "100", steps=steps, run=run)
    run = tmp_path / "model" / "killed"
    p = subprocess.Popen([PY, "-m", "gpt2_demo.train", *args("killed"), "--save-every", str(every)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / f"step-{2 * every:06d}").exists():                  # kill mid-run, after a checkpoint
        assert p.poll() is None, f"run ended before it could be killed: {p.stderr.read()}"
        assert time.time() < deadline; time.sleep(0.01)
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not (run / f"step-{steps:06d}").exists()                       # it really was cut short
    killed_at = max(int(c.name.split("-")[1]) for c in run.glob("step-*"))
    r = train(["--resume", "--run-name", "killed", "--out-dir", str(tmp_path / "model"), "--log-dir", str(tmp_path / "log"),
               "--data-dir", str(tmp_path / "datasets"), "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert f"resuming killed at step {killed_at}" in r.stdout
    r2 = train([*args("straight"), "--save-every", str(every)])
    assert r2.returncode == 0, r2.stderr
    a = json.loads((run / "summary.json").read_text())
    b = json.loads((tmp_path / "model" / "straight" / "summary.json").read_text())
    assert abs(a["final_train_loss"] - b["final_train_loss"]) <= 1e-6, (a, b)
    assert abs(a["val_loss"] - b["val_loss"]) <= 1e-6, (a, b)
    ha, hb = history(run / f"step-{steps:06d}"), history(tmp_path / "model" / "straight" / f"step-{steps:06d}")
    assert len(ha["train"]) == len(hb["train"]) == steps
    assert max(abs(x[2] - y[2]) for x, y in zip(ha["train"], hb["train"])) <= 1e-6
    assert not list(run.glob(".tmp-*"))


def test_max_steps_alone_runs(tmp_path, corpus):
    "A short run with the defaults for everything but --data and --max-steps (no default contradicts another)."
    r = subprocess.run([PY, "-m", "gpt2_demo.train", "--data", str(corpus), "--max-steps", "8", "--no-progress"],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads(next((tmp_path / "model").glob("*/summary.json")).read_text())
    assert s["steps"] == 8 and s["stopped"] is None and np.isfinite(s["val_loss"])


def test_help_lists_every_flag():
    r = subprocess.run([PY, "-m", "gpt2_demo.train", "--help"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0
    for flag in ["--data", "--tokenizer", "--preset", "--context-len", "--batch-size", "--grad-accum", "--max-steps", "--lr",
                 "--warmup-steps", "--eval-every", "--save-every", "--out-dir", "--log-dir", "--resume", "--init-from", "--seed",
                 "--precision", "--time-budget", "--compile", "--no-compile", "--demo"]:
        assert flag in r.stdout, flag
    assert "peak learning rate (default: 0.001)" in " ".join(r.stdout.split())   # help text from the field comments


# ---- --init-from: our checkpoint, or a Hugging Face save_pretrained folder -------------------------------------

def test_init_from_checkpoint_and_hf_folder(tmp_path, corpus):
    assert train(tiny_args(tmp_path, corpus, steps=30, run="base")).returncode == 0
    base = torch.load(tmp_path / "model" / "base" / "step-000030" / "train_state.pt", weights_only=True)["history"]["train"]
    # continued training starts where the checkpoint's weights are, not from a fresh initialisation
    r = train(tiny_args(tmp_path, corpus, "--init-from", str(tmp_path / "model" / "base" / "best"), steps=10, run="cont"))
    assert r.returncode == 0, r.stderr
    cont = history(tmp_path / "model" / "cont" / "step-000010")["train"]
    assert cont[0][2] < base[0][2] - 1.0 and abs(cont[0][2] - base[-1][2]) < 0.5, (cont[0], base[0], base[-1])
    r = train(["--resume", "--run-name", "cont", "--max-steps", "12", "--out-dir", str(tmp_path / "model"),   # a run that
               "--log-dir", str(tmp_path / "log"), "--data-dir", str(tmp_path / "datasets"), "--no-progress"])  # began --init-from
    assert r.returncode == 0 and "resuming cont at step 10" in r.stdout, r.stderr
    # a Hugging Face GPT-2 folder (as written by save_pretrained) with the gpt2 tokenizer: same loss as HF computes
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    hf.save_pretrained(tmp_path / "hf")
    r = train(tiny_args(tmp_path, corpus, "--init-from", str(tmp_path / "hf"), "--no-compact-vocab", "--precision", "fp32",
                        "--drop-rate", "0", "--warmup-steps", "1", steps=3, run="fromhf"))
    assert r.returncode == 0, r.stderr
    first = history(tmp_path / "model" / "fromhf" / "step-000003")["train"][0][2]   # step 1's loss: before any update
    from gpt2_demo.data import WindowSampler, prepare_data
    cache = prepare_data(str(corpus), "gpt2", root=tmp_path / "datasets", progress=False)
    x, y = WindowSampler(cache.train, 32, 4, seed=1337).batch(0)
    with torch.no_grad(): ref = torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    assert abs(first - ref) < 1e-4, (first, ref)
    # a compact-vocabulary checkpoint cannot continue on text with ids it lacks
    (tmp_path / "other.txt").write_text("\n\n".join(f"Completely different words: zebra quartz {i} ünïcödé ∑∫" for i in range(300)))
    r = train(tiny_args(tmp_path, tmp_path / "other.txt", "--init-from", str(tmp_path / "model" / "base" / "best"), run="bad"))
    assert r.returncode == 2 and "compact vocabulary lacks" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- --time-limit: stops, evaluates and saves at the stopping step; --resume can then train for longer ------------

def test_time_limit_then_resume_longer(tmp_path, corpus):
    r = train(tiny_args(tmp_path, corpus, "--time-limit", "0.05", "--warmup-steps", "10", steps=100000, run="timed"))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "model" / "timed"
    s = json.loads((run / "summary.json").read_text())
    assert "time limit" in s["stopped"] and 0 < s["steps"] < 100000
    (ckpt,) = [c for c in run.glob("step-*") if int(c.name.split("-")[1]) == s["steps"]]   # saved at the stopping step
    h = history(ckpt)
    assert h["val"][-1][0] == s["steps"] and np.isfinite(s["val_loss"])   # and evaluated there
    assert (run / "best" / "model.safetensors").is_file()
    # the same run, resumed with a larger budget, continues from that step to the new end
    r = train(["--resume", "--run-name", "timed", "--max-steps", str(s["steps"] + 5), "--out-dir", str(tmp_path / "model"),
               "--log-dir", str(tmp_path / "log"), "--data-dir", str(tmp_path / "datasets"), "--no-progress"])
    assert r.returncode == 0, r.stderr
    s2 = json.loads((run / "summary.json").read_text())
    assert s2["steps"] == s["steps"] + 5 and s2["stopped"] is None
    assert [row[0] for row in history(run / f"step-{s2['steps']:06d}")["train"]] == list(range(1, s2["steps"] + 1))
