"""End-to-end tests of `python -m gpt2_demo.classify`: a whole run with its baselines, prediction, user files,
bad input, and SIGKILL/resume exactness.

Every run is a real CLI process, on a tiny model saved by the test and a few hundred reviews it writes."""
import json, os, signal, subprocess, sys, tempfile, time
from pathlib import Path

import pytest
import torch

from gpt2_demo.checkpoint import load_checkpoint, save_checkpoint
from gpt2_demo.classify import GPTClassifier
from gpt2_demo.data import load_reviews, split_of
from gpt2_demo.model import DummyGPT, get_config
from gpt2_demo.tokenizer import ModelEncoding, get_tokenizer

PY = sys.executable
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1", GPT2_DEMO_CACHE=tempfile.mkdtemp(prefix="gpt2_demo-test-cache-"))


def classify(*args, stdin=None):
    return subprocess.run([PY, "-m", "gpt2_demo.classify", *map(str, args)], capture_output=True, text=True,
                          env=ENV, input=stdin)


def write_jsonl(path: Path, pairs, text="text", label="label") -> Path:
    path.write_text("".join(json.dumps({text: t, label: l}, ensure_ascii=False) + "\n" for t, l in pairs),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    "Three hundred of the shorter half of the reviews, a tiny model over their tokens, and an English one."
    d = tmp_path_factory.mktemp("classify")
    r = load_reviews()
    pairs = sorted(zip(r.texts, r.labels), key=lambda p: len(p[0]))[:9000:30]
    data = write_jsonl(d / "reviews.jsonl", pairs)
    cl = get_tokenizer("cl100k_base")
    ids = sorted({i for t, _ in pairs for i in cl.encode_ordinary(t)})
    torch.manual_seed(0)
    vocab = ModelEncoding(cl, ids).ids.tolist()
    zh = get_config("tiny", tokenizer="cl100k_base", vocab_ids=vocab, context_len=32)
    save_checkpoint(DummyGPT(zh), d / "tiny-zh")
    save_checkpoint(DummyGPT(get_config("tiny")), d / "tiny-en")
    return dict(dir=d, data=data, pairs=pairs, zh=d / "tiny-zh", en=d / "tiny-en")


def run_args(s, tmp: Path, *extra, data=None, init=None, run="r"):
    "Flags for a fast run under `tmp`."
    return ["--data", data or s["data"], "--init-from", init or s["zh"], "--epochs", "2", "--batch-size",
            "16", "--eval-every", "10", "--save-every", "10", "--precision", "fp32", "--run-name", run,
            "--out-dir", tmp / "model", "--log-dir", tmp / "log", "--no-progress", *extra]


# ---- a whole run, its outputs, prediction ------------------------------------------------------------------

def test_run_table_checkpoint_predict(tmp_path, setup):
    r = classify(*run_args(setup, tmp_path))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "model" / "r"
    s = json.loads((run / "summary.json").read_text())
    assert set(s["results"]) == {"majority", "tfidf", "random", "pretrained"}
    for k in ("random", "pretrained", "tfidf", "majority"):
        assert 0 <= s["results"][k]["val_accuracy"] <= 1 and 0 <= s["results"][k]["test_accuracy"] <= 1
    n = len(setup["pairs"])
    assert s["data"]["texts"] == n and sum(s["data"]["splits"].values()) == n
    assert s["table"] in r.stdout and "| majority class" in r.stdout and "random initialisation" in r.stdout
    # the texts longer than the context: said once, with their number (read in windows, by default)
    n_long = s["data"]["long_texts"]
    said = [l for l in r.stdout.splitlines() if "longer than the context" in l]
    assert n_long > 0 and said == [f"{n_long:,} of {n:,} texts are longer than the context: each is read in "
                                   f"windows (training: one at random each epoch; evaluation: all, their scores "
                                   f"averaged)"]
    # best/ is a classifier checkpoint that reloads, scoring what the summary says
    model = load_checkpoint(run / "best")
    assert isinstance(model, GPTClassifier) and model.labels == ["negative", "positive"]
    assert (run / "random" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "log" / "r" / "random").is_dir() and (tmp_path / "log" / "r" / "pretrained").is_dir()
    # --predict: one text, and each line of stdin
    p = classify("--predict", "这本书写得太好了", "--checkpoint", run)
    assert p.returncode == 0, p.stderr
    label, prob = p.stdout.strip().split("\t")
    assert label in model.labels and 0.5 <= float(prob) <= 1
    p = classify("--predict", "-", "--out-dir", tmp_path / "model", stdin="质量很差，不推荐\n\n非常满意\n")
    assert p.returncode == 0, p.stderr
    rows = [l.split("\t") for l in p.stdout.strip().splitlines()]
    assert [r[2] for r in rows] == ["质量很差，不推荐", "非常满意"] and all(r[0] in model.labels for r in rows)


@pytest.mark.parametrize("kind", ["csv", "json"])
def test_user_file_any_labels(tmp_path, setup, kind):
    pairs = [(t, {"positive": "好评", "negative": "差评"}[l]) for t, l in setup["pairs"]]
    if kind == "csv":
        import csv
        data = tmp_path / "d.csv"
        with open(data, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["review", "verdict"])
            w.writerows(pairs)
    else:
        data = tmp_path / "d.json"
        data.write_text(json.dumps([{"review": t, "verdict": l} for t, l in pairs], ensure_ascii=False))
    # json: each long text keeps its end instead; csv: windows of 24 tokens, which the classifier keeps reading
    whole = ["--no-whole-text"] if kind == "json" else ["--context-len", "24"]
    r = classify(*run_args(setup, tmp_path, "--text-field", "review", "--label-field", "verdict", "--labels",
                           "好评,差评", "--no-random-init", "--epochs", "1", *whole, data=data))
    assert r.returncode == 0, r.stderr
    model = load_checkpoint(tmp_path / "model" / "r" / "best")
    assert model.labels == ["好评", "差评"] and model.whole_text == (kind == "csv")
    assert model.read_len == (24 if kind == "csv" else None)
    long_ids = model.encode(["很好" * 40])[0]                  # --predict reads windows of what it was trained on
    assert max(len(w) for w in model.windows(long_ids)) == (24 if kind == "csv" else 32)
    said = [l for l in r.stdout.splitlines() if "longer than the context" in l]
    assert len(said) == 1 and (("each keeps its last 31 tokens" in said[0]) == (kind == "json"))
    assert "random initialisation" not in r.stdout and not (tmp_path / "model" / "r" / "random").exists()


# ---- bad input: one line, exit status 2, no traceback, nothing written -------------------------------------

def bad_inputs(s, d: Path) -> dict:
    "Case → (flags that replace or add to a good run's, the message expected)."
    pairs = s["pairs"]
    only_test = [(t, "neutral") for t, _ in pairs if split_of(t) == "test"][:3]
    unknown = [p for p in pairs if p[0] not in {t for t, _ in only_test}] + only_test
    save_checkpoint(GPTClassifier(DummyGPT(get_config("tiny")), ["a", "b"]), d / "classifier")
    return {
        "tokenizer mismatch": (["--init-from", s["en"]], "tokenizer (gpt2) spells"),
        "empty file": (["--data", write_jsonl(d / "empty.jsonl", [])], "has no labelled texts"),
        "one class": (["--data", write_jsonl(d / "one.jsonl", [(t, "positive") for t, _ in pairs])],
                      "only one label ('positive')"),
        "label only in test": (["--data", write_jsonl(d / "unknown.jsonl", unknown)],
                               "label 'neutral' (3 text(s) in the test split) is never in the train split"),
        "label not in --labels": (["--labels", "positive,neutral"], "label 'negative'"),
        "missing field": (["--label-field", "stars"], "has no field 'stars'"),
        "too few texts": (["--data", write_jsonl(d / "few.jsonl", pairs[:6])], "split is empty"),
        "missing model": (["--init-from", d / "no-such-model"], "--init-from"),
        "not a language model": (["--init-from", d / "classifier"], "not a language model"),
        "too many blocks": (["--train-blocks", "3"], "--train-blocks must be between 0 and the model's 2"),
        "context too long": (["--context-len", "64"], "exceeds the model's context 32"),
        "bad setting": (["--lr", "-1"], "--lr must be a positive number"),
        "bad optimizer": (["--adapt-optimizer", "sgd"], "invalid choice: 'sgd'"),
        "bad Muon rate": (["--optimizer", "muon", "--muon-lr", "0"], "--muon-lr must be a positive number"),
    }

BAD_CASES = ["tokenizer mismatch", "empty file", "one class", "label only in test", "label not in --labels",
             "missing field", "too few texts", "missing model", "not a language model", "too many blocks",
             "context too long", "bad setting", "bad optimizer", "bad Muon rate"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input(tmp_path, setup, case):
    extra, message = bad_inputs(setup, tmp_path / "in")[case]
    args = run_args(setup, tmp_path)
    for flag, value in zip(extra[::2], extra[1::2]):      # replace or add each flag
        if flag in args: args[args.index(flag) + 1] = value
        else: args += [flag, value]
    r = classify(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "model").exists() and not (tmp_path / "log").exists()


def test_predict_needs_a_classifier(tmp_path, setup):
    r = classify("--predict", "很好", "--checkpoint", setup["zh"])
    assert r.returncode == 2 and "not a classifier" in r.stderr and "Traceback" not in r.stderr
    r = classify("--predict", "很好", "--out-dir", tmp_path)
    assert r.returncode == 2 and "no classifier under" in r.stderr


def test_existing_run_is_not_overwritten(tmp_path, setup):
    assert classify(*run_args(setup, tmp_path, "--epochs", "0.5", "--no-random-init")).returncode == 0
    r = classify(*run_args(setup, tmp_path, "--epochs", "0.5", "--no-random-init"))
    assert r.returncode == 2 and "already has checkpoints" in r.stderr and "--resume" in r.stderr


# ---- exact resume after SIGKILL ----------------------------------------------------------------------------

def history(ckpt: Path) -> dict:
    return torch.load(ckpt / "train_state.pt", weights_only=True)["history"]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, setup):
    args = lambda run: run_args(setup, tmp_path, "--epochs", "4", "--drop-rate", "0.1", "--eval-every", "20",
                                run=run)                   # about 15 steps an epoch: 60 each, 120 in all
    assert classify(*args("full")).returncode == 0
    killed = tmp_path / "model" / "killed"
    p = subprocess.Popen([PY, "-m", "gpt2_demo.classify", *map(str, args("killed"))], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(killed.glob("step-*/train_state.pt")):   # kill mid-run, after a checkpoint
        assert p.poll() is None, p.stderr.read()
        assert time.time() < deadline, "no checkpoint within two minutes"
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert not (killed / "summary.json").exists()
    r = classify("--resume", "--run-name", "killed", "--out-dir", tmp_path / "model", "--log-dir",
                 tmp_path / "log", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "resuming killed" in r.stdout
    full = tmp_path / "model" / "full"
    for part in ("", "random"):
        last = sorted((full / part).glob("step-*"))
        assert len(last) == 1 and (killed / part / last[0].name).is_dir()
        assert history(last[0]) == history(killed / part / last[0].name)
    a, b = (json.loads((d / "summary.json").read_text())["results"] for d in (full, killed))
    assert a == b
