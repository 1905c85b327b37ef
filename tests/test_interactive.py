"""End-to-end tests of `interactive/interactive_generate.py`: the REPL through a pseudo-terminal, the scripting modes,
and every way of failing to start.

All models are tiny ones saved by the test itself: one with random weights (the mechanics, compared with `generate`
run here), and "scripted" ones whose blocks are zeroed so the next token depends on the position alone, which write a
known Chinese text (with 世 split over two tokens), never stop, or — with the chat template's tokens — answer
each question of a known conversation only when the whole conversation before it is in the prompt."""
import codecs, json, os, re, shutil, signal, subprocess, sys
from pathlib import Path

import pexpect
import pytest
import torch

from gpt2_demo.checkpoint import load_checkpoint, save_checkpoint
from gpt2_demo.generate import generate
from gpt2_demo.model import DummyGPT, get_config
from gpt2_demo.sft import TEMPLATE
from gpt2_demo.tokenizer import ModelEncoding, get_tokenizer

ROOT = Path(__file__).resolve().parent.parent
# fp32 decoding, so completions can be compared token for token with `generate` on the saved model (the default
# dtype is checked on its own in test_default_dtype)
TOOL = [sys.executable, str(ROOT / "interactive" / "interactive_generate.py"), "--dtype", "float32"]
ZH = "人民日报报道：北京今天天气晴朗。人民群众欢度新年。你好，世界！"
STATS = r"\[(\d+) tokens?, [\d.]+ tokens/s\]"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def env(home) -> dict:
    # CPU only: the references are computed on the CPU here, and CUDA's random streams differ from the CPU's.
    # One thread: tiny models on a busy 2-core machine are many times faster without thread contention.
    return dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                TERM="dumb", HOME=str(home), GPT2_DEMO_CACHE=str(home / "cache"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def scripted_model(enc: ModelEncoding, script: list[int], ctx: int = 64) -> DummyGPT:
    "A model whose next token after position p is `script[p]` (the last one repeats), whatever the input."
    # logit of token t at position p ∝ [script[p] == t] - (share of positions with t): so no token may fill them all
    specials = list(getattr(enc, "specials", ())) or None                 # the chat template's tokens, if any
    m = DummyGPT(get_config("tiny", tokenizer="cl100k_base", vocab_ids=enc.ids.tolist(), tie_weights=False,
                            context_len=ctx, specials=specials))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "tok_emb.weight" or ".out_proj." in name or ".ff.proj." in name: p.zero_()
        m.pos_emb.weight.copy_(torch.eye(ctx, m.cfg.emb_dim))
        m.out_head.weight.zero_()
        for pos, tok in enumerate((script + script[-1:] * ctx)[:ctx]): m.out_head.weight[tok, pos] += 10.0
    return m.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    "Checkpoint folders: zh (random, compact cl100k_base vocabulary), gpt2 (random), hello (scripted), endless (scripted)."
    d = tmp_path_factory.mktemp("ckpts")
    cl = get_tokenizer("cl100k_base")
    enc = ModelEncoding(cl, cl.encode(ZH))
    torch.manual_seed(0)
    save_checkpoint(DummyGPT(get_config("tiny", tokenizer="cl100k_base", vocab_ids=enc.ids.tolist())), d / "zh")
    save_checkpoint(DummyGPT(get_config("tiny")), d / "gpt2")
    dot, ren, min_ = enc.encode_ordinary(".")[0], enc.encode_ordinary("人")[0], enc.encode_ordinary("民")[0]
    save_checkpoint(scripted_model(enc, [dot] * 3 + enc.encode_ordinary("你好，世界！") + [enc.eot_token]), d / "hello")
    save_checkpoint(scripted_model(enc, [ren, min_] * 32), d / "endless")   # 民人民人…, then 民 for ever
    chat = ModelEncoding(cl, enc.ids, specials=TEMPLATE.specials)
    save_checkpoint(scripted_model(chat, chat_script(chat, TALK)), d / "chat", chat_template=TEMPLATE.name)
    long_script = chat_script(chat, LONG_TALK, kept=lambda i: [1] if i == 2 else range(i))   # 1st dropped
    save_checkpoint(scripted_model(chat, long_script), d / "chat-long", chat_template=TEMPLATE.name)
    return {k: d / k for k in ("zh", "gpt2", "hello", "endless", "chat", "chat-long")}


# a conversation, and one whose questions are so long that the third one drops the first exchange (context 64)
TALK = [("你好", "你好！"), ("北京今天天气？", "晴朗。"), ("谢谢", "不客气。")]
LONG_TALK = [("北京" * 8, "你好！"), ("人民" * 8, "晴朗。"), ("北京" * 12, "再见。")]


def chat_script(enc: ModelEncoding, exchanges, kept=lambda i: range(i), ctx: int = 64) -> list[int]:
    "A script answering question i of `exchanges` right after a prompt holding the exchanges `kept(i)`."
    end = enc.special_ids[TEMPLATE.end]
    question = lambda q: len(TEMPLATE.turn(enc, "user", q)) + 1           # with the assistant's token
    answer = lambda a: enc.encode_ordinary(a) + [end]
    script = [enc.encode_ordinary("。")[0]] * ctx
    for i, (q, a) in enumerate(exchanges):
        n = sum(question(exchanges[j][0]) + len(answer(exchanges[j][1])) for j in kept(i)) + question(q)
        script[n - 1:n - 1 + len(answer(a))] = answer(a)
    return script


def expected(ckpt: Path, prompt: str, n: int, temperature=0.0, top_k=None, top_p=None, seed=None,
             repetition_penalty=1.0) -> str:
    "What the tool must print for `prompt`: the text of the tokens `generate` produces, up to <|endoftext|>."
    m = load_checkpoint(ckpt)
    enc = m.cfg.encoding
    p = enc.encode_ordinary(prompt)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    new = generate(m, torch.tensor([p]), n, temperature, top_k, top_p, eos_id=enc.eot_token, generator=g,
                   repetition_penalty=repetition_penalty)[0, len(p):].tolist()
    if enc.eot_token in new: new = new[:new.index(enc.eot_token)]
    text = enc.decode(new)
    held = codecs.getincrementaldecoder("utf-8")("replace")
    held.decode(b"".join(enc.decode_single_token_bytes(t) for t in new))
    return text[:-1] if held.getstate()[0] else text     # a character cut by max_new_tokens is dropped, not shown as �


def run(*args, env, cwd=None, input=None) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOL, *map(str, args)], capture_output=True, text=True, encoding="utf-8", env=env, cwd=cwd,
                          input=input, timeout=120)


def spawn(*args, env, sigint_ignored=False) -> pexpect.spawn:
    "The REPL in a pseudo-terminal; `sigint_ignored` starts it as a background job of a non-interactive shell would."
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    child = pexpect.spawn(TOOL[0], [*TOOL[1:], *map(str, args)], env=env, encoding="utf-8", timeout=30, dimensions=(40, 500),
                          preexec_fn=ignore)
    child.expect_exact(">>> ")
    return child


def screen(text: str) -> str:
    "Terminal output as the program wrote it (the terminal turns each \\n into \\r\\n)."
    return text.replace("\r\n", "\n")


def ask(child: pexpect.spawn, prompt: str) -> tuple[str, int]:
    "Types `prompt`, waits for the speed line; returns (the streamed completion, its token count)."
    child.sendline(prompt)
    child.expect(STATS)
    echo, completion = screen(child.before).split("\n", 1)
    assert echo == prompt and completion.endswith("\n")
    n = int(child.match.group(1))
    child.expect_exact(">>> ")
    return completion[:-1], n


def command(child: pexpect.spawn, line: str) -> str:
    "Types a /command; returns what it printed (without the echo)."
    child.sendline(line)
    child.expect_exact(">>> ")
    echo, out = screen(child.before).split("\n", 1)
    assert echo == line
    return out


# ---- the REPL, through a pseudo-terminal ---------------------------------------------------------------------

def test_repl_streams_chinese_without_broken_characters(ckpts, env):
    child = spawn("--checkpoint", ckpts["hello"], "--greedy", env=env)
    text, n = ask(child, "你好")                  # the script: 2 dots, then 你好，世界！ (世 is 2 tokens), then <|endoftext|>
    assert (text, n) == ("..你好，世界！", 9)
    assert text == expected(ckpts["hello"], "你好", 100) and "\ufffd" not in text
    text, n = ask(child, "北京" * 70)            # longer than the context (64 tokens): cropped, at whose end the script ends
    assert (text, n) == ("", 0) == (expected(ckpts["hello"], "北京" * 70, 100), 0)
    child.sendline("")                            # an empty line: just a fresh prompt
    child.expect_exact(">>> ")
    assert screen(child.before) == "\n"
    child.sendline("/quit")
    child.expect(pexpect.EOF); child.close()
    assert child.exitstatus == 0


def test_repl_settings_and_seeded_sampling(ckpts, env, home):
    child = spawn("--checkpoint", ckpts["zh"], "--max-new-tokens", "20", env=env)
    assert command(child, "/temperature 0.7") == "temperature = 0.7\n"
    assert command(child, "/settings") == ("temperature 0.7, top_k 50, top_p off, max_new_tokens 20, seed off, "
                                           "repetition_penalty 1\n")
    # invalid values and unknown commands: one line, and the session goes on with the old settings
    assert command(child, "/temperature abc") == "error: temperature must be a number, got 'abc'\n"
    assert command(child, "/top_k 0") == "error: top_k must be an integer >= 1, got 0\n"
    assert command(child, "/top_p 1.5") == "error: top_p must be in (0, 1], got 1.5\n"
    assert command(child, "/frobnicate") == "error: unknown command /frobnicate; /help lists the commands\n"
    assert "/max_new_tokens N" in command(child, "/help")
    assert command(child, "/top_k off") == "top_k = off\n"
    assert command(child, "/seed 5") == "seed = 5\n"
    assert command(child, "/settings") == ("temperature 0.7, top_k off, top_p off, max_new_tokens 20, seed 5, "
                                           "repetition_penalty 1\n")
    a, _ = ask(child, "北京今天")
    b, _ = ask(child, "北京今天")                # reseeded per completion: the same text again
    assert a == b == expected(ckpts["zh"], "北京今天", 20, temperature=0.7, seed=5)
    command(child, "/greedy")
    c, _ = ask(child, "北京今天")
    assert c == expected(ckpts["zh"], "北京今天", 20)
    assert command(child, "/repetition_penalty 0") == "error: repetition_penalty must be a number > 0 (1 = off), got 0.0\n"
    assert command(child, "/repetition_penalty 1.5") == "repetition_penalty = 1.5\n"
    d, _ = ask(child, "北京今天")
    assert d == expected(ckpts["zh"], "北京今天", 20, repetition_penalty=1.5) != c
    child.sendline("/quit")
    child.expect(pexpect.EOF); child.close()
    assert child.exitstatus == 0
    history = (home / ".gpt2_demo_history").read_text(encoding="utf-8")
    assert "/seed 5" in history and "北京今天" in history


@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_repl_ctrl_c_and_ctrl_d(ckpts, env, sigint_ignored):
    # started with SIGINT ignored (as by `make test &`), Ctrl-C must still stop a completion: the REPL installs its handler
    child = spawn("--checkpoint", ckpts["endless"], env=env, sigint_ignored=sigint_ignored)
    command(child, "/max_new_tokens 1000000")
    child.sendline("你好")
    child.expect_exact("人民人民民民民民")       # streaming: output arrives while the completion is still running
    child.sendintr()                              # Ctrl-C during generation: stops it, back to the prompt
    child.expect_exact("[interrupted]", timeout=10)
    child.expect_exact(">>> ")
    assert screen(child.before) == "\n"
    child.sendintr()                              # Ctrl-C at the prompt: a fresh prompt
    child.expect_exact(">>> ")
    command(child, "/max_new_tokens 3")
    assert ask(child, "你好") == ("民人民", 3)    # the session still works
    child.sendeof()                               # Ctrl-D: exit 0
    child.expect(pexpect.EOF); child.close()
    assert child.exitstatus == 0


# ---- chat mode, through a pseudo-terminal -----------------------------------------------------------------

def test_chat_keeps_history_and_reset_clears_it(ckpts, env):
    child = spawn("--checkpoint", ckpts["chat"], "--chat", "--greedy", "--max-new-tokens", 10, env=env)
    for q, a in TALK:                               # the script has each answer only after the whole history
        assert ask(child, q)[0] == a
    assert command(child, "/reset") == "history cleared\n"
    text, _ = ask(child, TALK[1][0])                # a new conversation: the 2nd question alone finds filler
    assert text and set(text) == {"。"}
    command(child, "/reset")
    assert ask(child, TALK[0][0])[0] == TALK[0][1]
    assert "/reset" in command(child, "/help")
    child.sendline("/quit")
    child.expect(pexpect.EOF); child.close()
    assert child.exitstatus == 0


def test_chat_drops_oldest_exchange_to_fit_context(ckpts, env):
    child = spawn("--checkpoint", ckpts["chat-long"], "--chat", "--greedy", "--max-new-tokens", 16, env=env)
    assert ask(child, LONG_TALK[0][0])[0] == "你好！"
    assert ask(child, LONG_TALK[1][0])[0] == "晴朗。"
    text, _ = ask(child, LONG_TALK[2][0])           # room: 64 - 16 tokens; the first exchange no longer fits
    assert text == "再见。\n[dropped the 1 oldest exchange to stay within the context of 64 tokens]"
    child.sendeof()
    child.expect(pexpect.EOF); child.close()
    assert child.exitstatus == 0


def test_chat_prompt_and_stdin(ckpts, env):
    r = run("--checkpoint", ckpts["chat"], "--chat", "--prompt", TALK[0][0], "--greedy", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "你好！\n" and r.stderr.rstrip().endswith("chat template role-tokens/1")
    r = run("--checkpoint", ckpts["chat"], "--chat", "--greedy", env=env,
            input="".join(q + "\n" for q, _ in TALK) + "/reset\n" + TALK[0][0] + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n") == [a for _, a in TALK] + [TALK[0][1], ""]     # one chat; /reset starts anew
    assert "history cleared" in r.stderr
    r = run("--checkpoint", ckpts["chat"], "--prompt", TALK[0][0], "--greedy", "--max-new-tokens", 3, env=env)
    assert r.returncode == 0 and r.stderr.rstrip().endswith("(--chat to chat with it)")   # a completion


# ---- scripting ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which,prompt", [("zh", "人民日报"), ("gpt2", "Every effort moves you")])
def test_prompt_greedy_matches_generate(ckpts, env, which, prompt):
    r = run("--checkpoint", ckpts[which], "--prompt", prompt, "--greedy", "--max-new-tokens", 40, "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected(ckpts[which], prompt, 40) + "\n"          # the completion only, not the prompt
    tokenizer = "cl100k_base (compact" if which == "zh" else "gpt2,"
    assert r.stderr.count("\n") == 1 and re.match(rf"checkpoint {re.escape(str(ckpts[which]))}: [\d.]+M parameters, "
                                                  rf"tokenizer {re.escape(tokenizer)}.*device cpu, dtype float32$", r.stderr)


def test_stdin_lines_one_completion_per_line(ckpts, env):
    prompts = ["北京", "人民", "今天天气", "你好，世界"]
    r = run("--checkpoint", ckpts["zh"], "--seed", 3, "--max-new-tokens", 15, "--top-k", "off", "--temperature", 1.0,
            env=env, input="".join(p + "\n" for p in prompts))
    assert r.returncode == 0, r.stderr
    esc = lambda t: t.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    want = [esc(expected(ckpts["zh"], p, 15, temperature=1.0, seed=3)) for p in prompts]
    assert r.stdout.split("\n") == want + [""]
    assert ">>>" not in r.stdout and "tokens/s" not in r.stdout


def test_no_arguments_uses_newest_checkpoint(ckpts, env, tmp_path):
    shutil.copytree(ckpts["zh"], tmp_path / "model/a/step-000100")
    shutil.copytree(ckpts["hello"], tmp_path / "model/b/best")
    os.utime(tmp_path / "model/a/step-000100/model.safetensors", (1e9, 1e9))   # a is older
    r = run("--greedy", env=env, cwd=tmp_path, input="你好\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"checkpoint {Path('model/b/best')}: ")
    assert r.stdout == "..你好，世界！\n"


def test_hugging_face_model(env, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from gpt2_demo.hf import from_hf
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(tmp_path / "hf")
    r = run("--hf", tmp_path / "hf", "--prompt", "Hello, I am", "--greedy", "--max-new-tokens", 12, env=env)
    assert r.returncode == 0, r.stderr
    m, enc = from_hf(tmp_path / "hf"), get_tokenizer("gpt2")
    p = enc.encode("Hello, I am")
    new = generate(m, torch.tensor([p]), 12, eos_id=enc.eot_token)[0, len(p):].tolist()
    assert r.stdout == enc.decode(new[:new.index(enc.eot_token)] if enc.eot_token in new else new) + "\n"
    assert r.stderr.startswith(f"Hugging Face model {tmp_path / 'hf'}: ") and "tokenizer gpt2," in r.stderr


# ---- errors: one line on stderr, status 2, no traceback -------------------------------------------------------

def broken(ckpts, tmp_path, what) -> Path:
    "A copy of the zh checkpoint, damaged as `what` says."
    d = tmp_path / what
    shutil.copytree(ckpts["zh"], d)
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    if what == "corrupt-config": (d / "config.json").write_text('{"format": "gpt2_demo/1", "model": {', encoding="utf-8")
    elif what == "garbage-weights": (d / "model.safetensors").write_bytes(os.urandom(4096))
    elif what == "unknown-tokenizer": cfg["model"]["tokenizer"] = "p50k_base"
    elif what == "other-tokenizer": cfg["model"]["tokenizer"] = "gpt2"          # cl100k_base ids read as gpt2 ids
    elif what == "vocab-not-compact": cfg["model"]["vocab_ids"] = cfg["model"]["vocab_ids"][::-1]  # ids 0..n-1 renumbered
    if "tokenizer" in what or "vocab" in what: (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return d


@pytest.mark.parametrize("case,message", [
    ("no-checkpoint", "error: no checkpoint found under model/; train one first, e.g. with `make demo`"),
    ("corrupt-config", "config.json is corrupt"),
    ("garbage-weights", "model.safetensors cannot be loaded"),
    ("unknown-tokenizer", "uses tokenizer 'p50k_base', which is not supported"),
    ("other-tokenizer", "outside tokenizer gpt2's range"),
    ("vocab-not-compact", "vocab_ids is not a compact vocabulary of cl100k_base"),
    ("--temperature=-1", "error: temperature must be >= 0, got -1.0"),
    ("--top-k=many", "error: --top-k: expected an integer, or off, got 'many'"),
    ("--chat", "has no chat template (no chat tokens in its vocabulary); fine-tune it with gpt2-sft first"),
    ("--system=你是助手", "error: --system is a chat's first message: add --chat"),
])
def test_errors(ckpts, env, tmp_path, case, message):
    if case == "no-checkpoint": args = []
    elif case.startswith("--"): args = ["--checkpoint", ckpts["zh"], case]
    else: args = ["--checkpoint", broken(ckpts, tmp_path, case)]
    r = run(*args, "--prompt", "你好", env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_default_dtype(ckpts, env):
    "Without --dtype the tool decodes in the faster of bf16 and fp32 here (measured once, then cached): the same tokens as `generate` on that copy."
    from gpt2_demo.generate import prepare_for_inference
    args = TOOL[:2] + ["--checkpoint", str(ckpts["zh"]), "--prompt", "人民", "--greedy", "--max-new-tokens", "12"]
    runs = [subprocess.run(args, capture_output=True, text=True, env=env) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    dtypes = [re.search(r"dtype (\w+)$", r.stderr.rstrip()).group(1) for r in runs]
    assert dtypes[0] in ("bfloat16", "float32") and dtypes[1] == dtypes[0]     # the second run reads the cached choice
    m = prepare_for_inference(load_checkpoint(ckpts["zh"]), dtypes[0])
    enc = m.cfg.encoding
    p = enc.encode_ordinary("人民")
    new = generate(m, torch.tensor([p]), 12, eos_id=enc.eot_token)[0, len(p):].tolist()
    if enc.eot_token in new: new = new[:new.index(enc.eot_token)]
    assert runs[0].stdout == enc.decode(new) + "\n"
    r8 = subprocess.run(TOOL[:2] + ["--checkpoint", str(ckpts["zh"]), "--prompt", "人民", "--dtype", "int8", "--max-new-tokens", "5"],
                        capture_output=True, text=True, env=env)
    assert r8.returncode == 0 and "dtype int8" in r8.stderr, r8.stderr
