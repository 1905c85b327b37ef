"""End-to-end tests of `python -m gpt2_demo.sft` (instruction fine-tuning): the three record formats, the run
folder, exact resume after SIGKILL, the offline demonstration, and every kind of bad input.

Every run is a real CLI process on a tiny model saved by the test itself (context 64, compact vocabulary)."""
import json, os, signal, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from gpt2_demo.checkpoint import load_checkpoint, read_config, save_checkpoint
from gpt2_demo.model import DummyGPT, get_config
from gpt2_demo.sft import TEMPLATE
from gpt2_demo.tokenizer import ModelEncoding, get_tokenizer

PY = sys.executable
CHAT = Path(__file__).resolve().parent.parent / "interactive" / "interactive_generate.py"
# one thread per process (tiny models, a busy machine); the hub unreachable whatever the network
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
           GPT2_DEMO_CACHE=tempfile.mkdtemp(prefix="gpt2_demo-test-cache-"))

PAIRS = ["大小", "上下", "多少", "长短", "高低", "快慢", "前后", "左右", "开关", "新旧", "冷热", "轻重", "远近",
         "早晚", "黑白", "东西", "南北", "买卖", "进出", "来去"]


def records(fmt: str) -> list[dict]:
    "The opposites task (一 word → its opposite) as records of format `fmt`."
    q = lambda a: f"“{a}”的反义词是什么？"
    if fmt == "alpaca": return [{"instruction": q(a), "input": "", "output": b} for a, b in PAIRS]
    if fmt == "messages":
        return [{"messages": [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": q(a)},
                              {"role": "assistant", "content": b}]} for a, b in PAIRS]
    return [{"conversations": [{"from": "human", "value": q(a)}, {"from": "gpt", "value": b}]}
            for a, b in PAIRS]


def write(path: Path, recs, jsonl: bool = True) -> Path:
    dump = lambda x: json.dumps(x, ensure_ascii=False)
    path.write_text("".join(dump(r) + "\n" for r in recs) if jsonl else dump(recs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    "A tiny pretrained-style checkpoint (random weights) whose compact vocabulary covers the opposites task."
    d = tmp_path_factory.mktemp("pretrained")
    cl = get_tokenizer("cl100k_base")
    text = "".join(json.dumps(r, ensure_ascii=False) for r in records("messages"))
    ids = ModelEncoding(cl, cl.encode(text)).ids
    torch.manual_seed(0)
    save_checkpoint(DummyGPT(get_config("tiny", tokenizer="cl100k_base", vocab_ids=ids.tolist())), d / "tiny")
    return d / "tiny"


def args(tmp: Path, data, init, *extra, steps=6, run="r"):
    "Flags for a fast run: everything under `tmp`."
    return ["--data", str(data), "--init-from", str(init), "--max-steps", str(steps), "--batch-size", "4",
            "--eval-every", "3", "--save-every", "3", "--eval-examples", "8", "--precision", "fp32",
            "--device", "cpu", "--out-dir", str(tmp / "model"), "--log-dir", str(tmp / "log"),
            "--run-name", run, "--no-progress", *extra]


def sft(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "gpt2_demo.sft", *map(str, argv)], capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


# ---- the three formats train, and the run folder holds what the REPL needs --------------------------------

@pytest.mark.parametrize("fmt,jsonl", [("alpaca", True), ("messages", False), ("sharegpt", True)])
def test_formats_train(tmp_path, tiny, fmt, jsonl):
    data = write(tmp_path / f"data.{'jsonl' if jsonl else 'json'}", records(fmt), jsonl)
    r = sft(args(tmp_path, data, tiny))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "model" / "r"
    assert sorted(p.name for p in run.iterdir()) == ["best", "step-000003", "step-000006", "summary.json"]
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 6 and s["train_conversations"] + s["val_conversations"] == len(PAIRS)
    cfg = read_config(run / "best")
    assert cfg["chat_template"] == TEMPLATE.name and cfg["model"]["specials"] == TEMPLATE.specials
    assert cfg["task"] == "sft" and cfg["settings"]["data"] == str(data)
    assert cfg["model"]["vocab_ids"] == read_config(tiny)["model"]["vocab_ids"]      # the compact vocabulary
    assert list((tmp_path / "log" / "r").glob("events.out.tfevents.*"))
    assert "exactly right (greedy)" in r.stdout
    assert f"gpt2-chat --checkpoint {run / 'best'} --chat" in r.stdout
    if fmt != "alpaca": return
    chat = subprocess.run([PY, str(CHAT), "--checkpoint", str(run / "best"), "--chat", "--prompt",
                           "“大”的反义词是什么？", "--greedy", "--max-new-tokens", "4"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert chat.returncode == 0 and chat.stderr.rstrip().endswith("chat template role-tokens/1"), chat.stderr


# ---- exact resume after SIGKILL ---------------------------------------------------------------------------

def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny):
    data = write(tmp_path / "d.jsonl", records("alpaca"))
    steps, every = 200, 10
    run_args = lambda run: args(tmp_path, data, tiny, "--drop-rate", "0.1", "--eval-every", "100",
                                "--save-every", str(every), steps=steps, run=run)
    killed = tmp_path / "model" / "killed"
    p = subprocess.Popen([PY, "-m", "gpt2_demo.sft", *run_args("killed")], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (killed / f"step-{2 * every:06d}").exists():          # kill mid-run, after a checkpoint
        assert p.poll() is None, p.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    r = sft(["--resume", "--run-name", "killed", "--out-dir", tmp_path / "model", "--log-dir",
             tmp_path / "log", "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert "resuming killed at step" in r.stdout
    r = sft(run_args("straight"))
    assert r.returncode == 0, r.stderr
    a, b = (load_checkpoint(tmp_path / "model" / n / f"step-{steps:06d}") for n in ("killed", "straight"))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()): assert torch.equal(v, w), k
    history = lambda n: torch.load(tmp_path / "model" / n / f"step-{steps:06d}" / "train_state.pt",
                                   weights_only=True)["history"]
    assert history("killed") == history("straight")


# ---- the offline demonstration -----------------------------------------------------------------------------

def test_demo_from_newest_pretrained(tmp_path, tiny):
    (tmp_path / "model" / "pre").mkdir(parents=True)
    os.symlink(tiny, tmp_path / "model" / "pre" / "best")            # the newest (only) pretrained checkpoint
    r = sft(["--demo", "--max-steps", 2, "--max-samples", 64, "--batch-size", 4, "--eval-examples", 8,
             "--test-examples", 10, "--precision", "fp32", "--device", "cpu", "--out-dir", tmp_path / "model",
             "--log-dir", tmp_path / "log", "--run-name", "demo", "--no-progress"])
    assert r.returncode == 0, r.stderr
    head = "| exactly right (greedy) | sentiment (n=10) | part of speech (n=10) | all (n=20) |"
    lines = r.stdout.split(head)[1]
    rows = [l.split(" | ")[0].lstrip("| ") for l in lines.strip().splitlines()[1:5]]
    assert rows == ["most common training answer", "pretrained, before fine-tuning",
                    "pretrained + SFT (2 steps)", "random init + SFT (2 steps)"]
    out = json.loads((tmp_path / "model" / "demo" / "demo.json").read_text())
    assert out["model"] == f"checkpoint {tmp_path / 'model' / 'pre' / 'best'}" and out["table"] in r.stdout
    for run in ("pretrained", "random"):
        cfg = read_config(tmp_path / "model" / "demo" / run / "best")
        assert cfg["task"] == "sft" and cfg["settings"]["random_init"] == (run == "random")


# ---- bad input: one line, exit status 2, no traceback, nothing left behind --------------------------------

def bad_inputs(d: Path, tiny: Path) -> dict:
    "case -> (the data or extra flags, a part of the one-line message)."
    write(d / "fields.jsonl", [{"text": "你好", "label": 1}] * 5)
    write(d / "no-response.jsonl", records("alpaca")[:2] + [{"instruction": "写诗", "input": "", "output": ""}])
    write(d / "roles.jsonl", [{"messages": [{"role": "bot", "content": "你好"}]}] * 3)
    write(d / "one.jsonl", records("alpaca")[:1])
    write(d / "long.jsonl", [{"instruction": "长" * 300, "input": "", "output": "是"}] * 4)
    write(d / "empty-array.json", [], jsonl=False)
    (d / "empty.jsonl").write_text("")
    (d / "broken.jsonl").write_text(json.dumps(records("alpaca")[0]) + "\n{oops\n")
    (d / "gbk.jsonl").write_bytes(json.dumps({"instruction": "你好", "output": "好"}, ensure_ascii=False)
                                  .encode("gbk"))
    (d / "data.csv").write_text("instruction,output\n你好,好\n")
    ok = write(d / "ok.jsonl", records("alpaca"))
    return {
        "unknown fields": ([d / "fields.jsonl"], "line 1: not an instruction record (found: text, label)"),
        "wrong --format": ([ok, "--format", "messages"], "ok.jsonl line 1: the conversation must be a non-"),
        "no response": ([d / "no-response.jsonl"], "no-response.jsonl line 3: no response"),
        "unknown role": ([d / "roles.jsonl"], "unknown role 'bot' (roles: system, user, assistant)"),
        "empty file": ([d / "empty.jsonl"], "empty.jsonl: no records"),
        "no records": ([d / "empty-array.json"], "empty-array.json: no records"),
        "one record": ([d / "one.jsonl"], "one conversation; training and validation need at least two"),
        "bad JSON": ([d / "broken.jsonl"], "broken.jsonl line 2: not valid JSON"),
        "not UTF-8": ([d / "gbk.jsonl"], "gbk.jsonl: not valid UTF-8"),
        "file type": ([d / "data.csv"], "unsupported file type '.csv'"),
        "missing file": ([d / "nope.jsonl"], "nope.jsonl: no such file"),
        "hub offline": (["someone/alpaca-zh"], "cannot reach the Hugging Face hub to download 'someone/"),
        "longer than the context": ([d / "long.jsonl"], "is longer than the model's context (64 tokens)"),
        "bad --init-from": ([ok, "--init-from", d / "no-model"], f"--init-from {d / 'no-model'}: "),
        "demo with data": ([ok, "--demo"], "--demo runs on its own data"),
    }


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, tiny) -> dict:
    "case -> (its folder, the finished process); four processes at a time (most of their time is start-up)."
    def one(case):
        d = tmp_path_factory.mktemp("bad")
        data, _ = bad_inputs(d, tiny)[case]
        return case, (d, sft(args(d, data[0], tiny, *data[1:])))
    with ThreadPoolExecutor(4) as pool: return dict(pool.map(one, CASES))

CASES = list(bad_inputs(Path(tempfile.mkdtemp()), Path("x")))

@pytest.mark.parametrize("case", CASES)
def test_bad_input(bad_runs, case):
    tmp_path, r = bad_runs[case]
    message = bad_inputs(tmp_path, Path("x"))[case][1]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "model").exists() and not (tmp_path / "log").exists()


def test_resume_without_run_and_existing_run(tmp_path, tiny):
    r = sft(["--resume", "--out-dir", tmp_path / "model", "--no-progress"])
    assert r.returncode == 2
    assert r.stderr.startswith("error: --resume: no sft run with a checkpoint under")
    data = write(tmp_path / "ok.jsonl", records("alpaca"))
    assert sft(args(tmp_path, data, tiny, steps=3)).returncode == 0
    r = sft(args(tmp_path, data, tiny, steps=3))
    assert r.returncode == 2 and "already has checkpoints; continue it with --resume --run-name r" in r.stderr
    r = sft(args(tmp_path, data, tmp_path / "model" / "r" / "best", steps=3, run="again"))   # SFT of SFT
    assert r.returncode == 0, r.stderr


def test_chat_needs_a_fine_tuned_model(tiny):
    r = subprocess.run([PY, str(CHAT), "--checkpoint", str(tiny), "--chat", "--prompt", "你好"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"error: --chat: checkpoint {tiny} has no chat template (no chat tokens in its "
                        f"vocabulary); fine-tune it with gpt2-sft first, or leave out --chat\n")
