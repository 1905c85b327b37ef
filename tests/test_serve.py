"""End-to-end tests of `gpt2-serve`: real server processes on a free 127.0.0.1 port, driven by the official `openai`
package, raw HTTP (httpx), `gpt2-chat --prompt`, and the chat page in headless Chromium.

Two tiny models saved here: `zh`, a random model with a compact Chinese vocabulary and a 256-token context (its
generations are long enough to interrupt), and `chat`, the scripted chat model of `test_interactive.py`, which
answers each question of a known conversation only when the whole conversation before it is in the prompt.
References are computed here with `generate` on the saved checkpoint and ids built by hand from the template's
special tokens."""
import base64, codecs, json, os, re, shutil, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from gpt2_demo.checkpoint import load_checkpoint, save_checkpoint
from gpt2_demo.generate import generate
from gpt2_demo.model import DummyGPT, get_config
from gpt2_demo.sft import TEMPLATE
from gpt2_demo.tokenizer import ModelEncoding, get_tokenizer
from test_interactive import LONG_TALK, TALK, ZH, chat_script, scripted_model

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 1024                         # the server's limit per request (its default)
PROMPTS = ["北京今天", "人民日报报道", "你好，世界", "新年", "人民群众欢度", "天气晴朗", "北京", "报道："]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("serve-ckpts")
    cl = get_tokenizer("cl100k_base")
    enc = ModelEncoding(cl, cl.encode(ZH))
    torch.manual_seed(0)
    save_checkpoint(DummyGPT(get_config("tiny", tokenizer="cl100k_base", vocab_ids=enc.ids.tolist(),
                                        context_len=256)), d / "zh")
    chat = ModelEncoding(cl, enc.ids, specials=TEMPLATE.specials)
    save_checkpoint(scripted_model(chat, chat_script(chat, TALK)), d / "chat", chat_template=TEMPLATE.name)
    long_script = chat_script(chat, LONG_TALK, kept=lambda i: [1] if i == 2 else range(i))   # 1st dropped
    save_checkpoint(scripted_model(chat, long_script), d / "chat-long", chat_template=TEMPLATE.name)
    return {"zh": d / "zh", "chat": d / "chat", "chat-long": d / "chat-long"}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("serve-home")
    return dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                HOME=str(home), GPT2_DEMO_CACHE=str(home / "cache"), NO_PROXY="127.0.0.1,localhost")


class Server:
    "A `gpt2-serve` process on a free port of 127.0.0.1 (`--port 0`); its output goes to a log file."
    def __init__(self, args, env, log: Path):
        self.log_path = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "gpt2_demo.serve", "--port", "0", "--device", "cpu",
                                          "--dtype", "float32", *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                                         env=env, cwd=ROOT)
        deadline = time.monotonic() + 90
        while not (m := re.search(r"at (http://127\.0\.0\.1:\d+)/ ", self.log())):
            assert self.proc.poll() is None, f"gpt2-serve exited: {self.log()}"
            assert time.monotonic() < deadline, f"gpt2-serve did not start in 90 s: {self.log()}"
            time.sleep(0.1)
        self.url = m.group(1)
        self.http = httpx.Client(base_url=self.url, timeout=60, trust_env=False)
        self.name = self.http.get("/v1/models").json()["data"][0]["id"]

    def log(self) -> str: return self.log_path.read_text(encoding="utf-8", errors="replace")

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), timeout=60,
                             max_retries=0, http_client=httpx.Client(trust_env=False), **kw)

    def job(self, job_id: str, timeout=20.0) -> dict:
        "The server's record of finished job `job_id` (from /health), waiting for it to finish."
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for j in self.http.get("/health").json()["recent"]:
                if j["id"] == job_id: return j
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s")

    def stop(self):
        self.http.close()
        self.proc.terminate()
        try: self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired: self.proc.kill()


@pytest.fixture(scope="module")
def zh(ckpts, env, tmp_path_factory):
    s = Server(["--checkpoint", ckpts["zh"]], env, tmp_path_factory.mktemp("logs") / "zh.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def chat(ckpts, env, tmp_path_factory):
    s = Server(["--checkpoint", ckpts["chat"], "--max-chars", 500, "--name", "tiny-chat"], env,
               tmp_path_factory.mktemp("logs") / "chat.log")
    yield s
    s.stop()


def decode_kept(enc, ids: list[int]) -> str:
    "The text of `ids` as a stream shows it: a character cut at the end is dropped, not shown as �."
    held = codecs.getincrementaldecoder("utf-8")("replace")
    text = held.decode(b"".join(enc.decode_single_token_bytes(t) for t in ids))
    return text


def reference(ckpt: Path, ids: list[int], n: int, end: int | None = None, repetition_penalty=1.0) -> tuple[str, str]:
    "(text, finish_reason) that greedy decoding of the saved model gives after `ids`."
    m = load_checkpoint(ckpt)
    enc = m.cfg.encoding
    end = enc.eot_token if end is None else end
    new = generate(m, torch.tensor([ids]), n, eos_id=end, repetition_penalty=repetition_penalty)[0, len(ids):].tolist()
    finish = "stop" if end in new else "length"
    return decode_kept(enc, new[:new.index(end)] if end in new else new), finish


def chat_ids(enc, messages) -> list[int]:
    "The prompt of `messages`, built by hand from the template's special tokens."
    sp = enc.special_ids
    ids = [i for m in messages for i in [sp[f"<|{m['role']}|>"], *enc.encode_ordinary(m["content"]), sp["<|end|>"]]]
    return ids + [sp["<|assistant|>"]]


# ---- the official openai client ------------------------------------------------------------------------------

def test_openai_completions_stream_and_not(zh, ckpts):
    enc = load_checkpoint(ckpts["zh"]).cfg.encoding
    want, finish = reference(ckpts["zh"], enc.encode_ordinary("北京今天"), 30, repetition_penalty=1.3)
    c = zh.client()
    r = c.completions.create(model=zh.name, prompt="北京今天", max_tokens=30, temperature=0,
                             extra_body={"repetition_penalty": 1.3})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, finish) and want
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(enc.encode_ordinary("北京今天")), 30)
    # frequency_penalty 0.6 maps onto repetition_penalty 1 + 0.6 / 2 = 1.3: the same text
    chunks = list(c.completions.create(model=zh.name, prompt="北京今天", max_tokens=30, temperature=0,
                                       frequency_penalty=0.6, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length" and all(ch.choices[0].finish_reason is None
                                                                    for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1 and all(ch.created > 0 and ch.model == zh.name for ch in chunks)
    # a seed makes sampling reproducible; stop strings cut the text before them
    kw = dict(model=zh.name, prompt="北京今天", max_tokens=40, temperature=0.9, seed=7)
    a, b = (c.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b
    stop = want[5:7]
    r = c.completions.create(model=zh.name, prompt="北京今天", max_tokens=30, temperature=0, stop=[stop],
                             extra_body={"repetition_penalty": 1.3})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want[:want.find(stop)], "stop")


def test_openai_chat_multi_turn_stream_and_not(chat, ckpts):
    "The scripted chat model answers each question only when the whole conversation so far is in the prompt."
    c, messages = chat.client(), []
    assert chat.http.get("/v1/models").json()["data"][0]["chat"] is True
    for i, (question, answer) in enumerate(TALK):
        messages.append({"role": "user", "content": question})
        if i % 2 == 0:
            r = c.chat.completions.create(model=chat.name, messages=messages, max_tokens=10, temperature=0)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
            assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
            assert r.usage.prompt_tokens == len(chat_ids(load_checkpoint(ckpts["chat"]).cfg.encoding, messages))
        else:
            chunks = list(c.chat.completions.create(model=chat.name, messages=messages, max_tokens=10,
                                                    temperature=0, stream=True))
            assert chunks[0].choices[0].delta.role == "assistant"
            assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
            finish = chunks[-1].choices[0].finish_reason
        assert (text, finish) == (answer, "stop")           # answered only with the whole conversation before it
        messages.append({"role": "assistant", "content": text})


def test_openai_client_sees_errors(zh):
    with pytest.raises(openai.BadRequestError, match="use /v1/completions"):
        zh.client().chat.completions.create(model=zh.name, messages=[{"role": "user", "content": "你好"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        zh.client().completions.create(model="gpt-4", prompt="你好")


def test_keep_alive_answers_without_delay(zh):
    "A reused connection is answered at once (TCP_NODELAY: no 40 ms wait between Nagle and delayed ACKs)."
    times = []
    for _ in range(9):
        t = time.perf_counter()
        assert zh.http.get("/health").status_code == 200
        times.append(time.perf_counter() - t)
    assert sorted(times)[4] < 0.03, times


def test_system_and_developer_messages(chat, ckpts):
    "A system message (or OpenAI's newer `developer`) is the template's system turn."
    enc = load_checkpoint(ckpts["chat"]).cfg.encoding
    for role in ("system", "developer"):
        messages = [{"role": role, "content": "你是助手"}, {"role": "user", "content": "你好"}]
        r = chat.http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
        want = chat_ids(enc, [{"role": "system", "content": "你是助手"}, messages[1]])
        assert r["usage"]["prompt_tokens"] == len(want)


def test_raw_sse_shape_and_usage(zh):
    body = {"model": zh.name, "prompt": "你好", "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with zh.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode("utf-8")
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]            # the stream ends with [DONE]
    objs = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == 12
    assert objs[-2]["choices"][0]["finish_reason"] == "length"


def test_same_text_as_gpt2_chat_prompt(zh, ckpts, env):
    "At temperature 0 the streamed text, the non-streamed text and `gpt2-chat --prompt` are identical."
    args = ["--checkpoint", ckpts["zh"], "--dtype", "float32", "--prompt", "人民日报", "--greedy",
            "--max-new-tokens", "40", "--repetition-penalty", "1.2"]
    repl = subprocess.run([sys.executable, "-m", "gpt2_demo.interactive", *map(str, args)], capture_output=True,
                          text=True, encoding="utf-8", env=env, timeout=120)
    assert repl.returncode == 0, repl.stderr
    c, kw = zh.client(), dict(model=zh.name, prompt="人民日报", max_tokens=40, temperature=0,
                              extra_body={"repetition_penalty": 1.2})
    whole = c.completions.create(**kw).choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw))
    assert repl.stdout == whole + "\n" and streamed == whole and whole


# ---- concurrency and cancellation ----------------------------------------------------------------------------

def test_eight_concurrent_clients_get_their_own_answers(zh):
    c = zh.client()
    def ask(i):
        kw = dict(model=zh.name, prompt=PROMPTS[i], max_tokens=40, stream=True,
                  **(dict(temperature=0, extra_body={"repetition_penalty": 1.3}) if i % 2 else
                     dict(temperature=0.9, seed=i)))                   # greedy and seeded sampling, interleaved
        chunks = list(c.completions.create(**kw))
        return "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
    alone = [ask(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool: together = list(pool.map(ask, range(8)))
    assert together == alone
    assert all(text and finish in ("stop", "length") for text, finish in alone)
    assert len({text for text, _ in alone}) == 8


def test_health_answers_during_a_long_generation_and_a_waiting_client_may_leave(zh):
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(lambda: zh.client().completions.create(model=zh.name, prompt="北京", temperature=0,
                                                                  max_tokens=MAX_TOKENS))
        busy, slowest, deadline = 0, 0.0, time.monotonic() + 60
        while not long.done() and time.monotonic() < deadline:
            t = time.perf_counter()
            h = zh.http.get("/health").json()
            slowest = max(slowest, time.perf_counter() - t)
            busy += h["busy"]
            if busy == 1:                     # a second request waits behind the long one, then its client leaves
                body = {"prompt": "你好", "max_tokens": 5, "stream": True}
                with zh.http.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200 and zh.http.get("/health").json()["waiting"] == 1
                    served = zh.http.get("/health").json()["served"]
            time.sleep(0.02)
        assert long.result().usage.completion_tokens == MAX_TOKENS
    assert busy >= 3 and slowest < 0.5, (busy, slowest)          # answered, quickly, while the model was busy
    h = zh.http.get("/health").json()
    assert h["served"] == served + 2 and h["recent"][-1]["tokens"] == 0                 # dropped at its turn
    assert h["recent"][-1]["finish"] == "cancelled" and h["recent"][-2]["tokens"] == MAX_TOKENS


def test_disconnect_stops_the_generation(zh):
    body = {"model": zh.name, "prompt": "北京", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with zh.http.stream("POST", "/v1/completions", json=body) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
            if len(events) == 3: break                      # then the connection is closed
    job = zh.job(events[0]["id"].removeprefix("cmpl-"))
    assert job["finish"] == "cancelled" and job["tokens"] < MAX_TOKENS
    assert job["tokens_after_cancel"] is not None and job["tokens_after_cancel"] <= 1, job
    r = zh.http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3    # the server goes on


def test_disconnect_stops_a_non_streamed_generation(zh):
    served = zh.http.get("/health").json()["served"]
    with httpx.Client(base_url=zh.url, timeout=0.5, trust_env=False) as impatient:
        with pytest.raises(httpx.ReadTimeout):           # the client gives up and closes the connection
            impatient.post("/v1/completions", json={"prompt": "北京", "max_tokens": MAX_TOKENS, "temperature": 0})
    deadline = time.monotonic() + 20
    while (h := zh.http.get("/health").json())["served"] == served:
        assert time.monotonic() < deadline, "the generation did not end"
        time.sleep(0.05)
    job = h["recent"][-1]
    assert job["finish"] == "cancelled" and job["tokens"] < MAX_TOKENS, job


# ---- bad requests ---------------------------------------------------------------------------------------------

def msgs(*contents): return [{"role": "user", "content": c} for c in contents]

BAD = [  # (server, path, body, status, code, words in the message)
    ("zh", "/v1/completions", b"{not json", 400, "invalid_json", "not valid JSON"),
    ("zh", "/v1/completions", [1, 2], 400, "invalid_json", "JSON object"),
    ("zh", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found", "does not exist"),
    ("zh", "/v1/chat/completions", {"messages": msgs("hi")}, 400, "no_chat_template", "use /v1/completions"),
    ("zh", "/v1/completions", {"prompt": "北京" * 300}, 400, "context_length_exceeded",
     "more than the model's context of 256 tokens"),
    ("zh", "/v1/completions", {"prompt": 5}, 400, "invalid_prompt", "prompt must be a string"),
    ("zh", "/v1/completions", {"prompt": ["a", "b"]}, 400, "invalid_prompt", "n > 1"),
    ("zh", "/v1/completions", {"prompt": "hi", "temperature": 5}, 400, "out_of_range", "temperature must be in"),
    ("zh", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "out_of_range", "top_p must be in (0, 1]"),
    ("zh", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "out_of_range", "max_tokens must be in"),
    ("zh", "/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400, "out_of_range", "[1, 1024]"),
    ("zh", "/v1/completions", {"prompt": "hi", "seed": "x"}, 400, "invalid_type", "seed must be an integer"),
    ("zh", "/v1/completions", {"prompt": "hi", "n": 2}, 400, "unsupported", "n > 1 is not supported"),
    ("zh", "/v1/completions", {"prompt": "hi", "logprobs": 3}, 400, "unsupported", "logprobs is not supported"),
    ("zh", "/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "invalid_type", "stream must be"),
    ("zh", "/v1/completions", {"prompt": "hi", "presence_penalty": -1}, 400, "unsupported", "negative"),
    ("zh", "/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "out_of_range", "(0, 10]"),
    ("chat", "/v1/chat/completions", {"messages": []}, 400, "invalid_messages", "non-empty list"),
    ("chat", "/v1/chat/completions", {"messages": "hi"}, 400, "invalid_messages", "non-empty list"),
    ("chat", "/v1/chat/completions", {"messages": [{"role": "bot", "content": "hi"}]}, 400, "invalid_role", "bot"),
    ("chat", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "invalid_content", "content"),
    ("chat", "/v1/chat/completions", {"messages": msgs("长" * 501)}, 400, "message_too_long", "501 characters"),
    ("chat", "/v1/chat/completions", {"messages": msgs("北京" * 60)}, 400, "context_length_exceeded", "drop the oldest"),
    ("chat", "/v1/chat/completions", {"messages": msgs("hi"), "tools": [{"type": "function"}]}, 400, "unsupported",
     "tools"),
    ("chat", "/v1/embeddings", {"input": "hi"}, 404, "not_found", "/v1/chat/completions"),
]


def test_errors(zh, chat):
    servers = {"zh": zh, "chat": chat}
    for server, path, body, status, code, words in BAD:
        s = servers[server]
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = s.http.post(path, content=content, headers={"Content-Type": "application/json"})
        assert "error" in r.json(), (body, r.text)
        err = r.json()["error"]
        assert (r.status_code, err["code"]) == (status, code), (body, r.text)
        assert set(err) == {"message", "type", "param", "code"} and words in err["message"], (body, err)
    for s in (zh, chat):                                   # no traceback, and the server goes on serving
        assert "Traceback" not in s.log()
        assert s.http.post("/v1/completions", json={"prompt": "你好", "max_tokens": 2}).status_code == 200


# ---- the page, in headless Chromium -----------------------------------------------------------------------------

class Browser:
    "Headless Chromium driven over the Chrome DevTools Protocol (a websocket): no driver, nothing downloaded."
    def __init__(self, exe: str, profile: Path):
        import websocket
        self.proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--no-default-browser-check", "--no-proxy-server", f"--user-data-dir={profile}",
                                      "--remote-debugging-port=0", "--remote-allow-origins=*",
                                      "--window-size=1000,720", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{exe} did not start (exit status {self.proc.poll()})")
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", trust_env=False).json()
                 if t["type"] == "page"]
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.n = 0

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:                                            # events in between are not needed here
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def wait(self, expr: str, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expr)):
            assert time.monotonic() < deadline, (f"still false after {timeout} s: {expr}; the page shows: "
                                                 + str(self.js("document.body.innerText")))
            time.sleep(0.02)
        return value

    def open(self, url: str):
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && document.body.dataset.state === 'idle'")

    def type(self, text: str):
        "Types `text` into the prompt box (as an input method would) and presses Send."
        self.js("document.getElementById('prompt').focus()")
        self.call("Input.insertText", text=text)
        self.js("document.getElementById('send').click()")

    def set(self, **controls):
        for k, v in controls.items(): self.js(f"document.getElementById('{k}').value = '{v}'")

    def close(self):
        if getattr(self, "ws", None): self.ws.close()
        self.proc.terminate()
        try: self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired: self.proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    try: b = Browser(exe, tmp_path_factory.mktemp("chromium")) if exe else None
    except Exception as e: b, why = None, f"Chromium cannot run here ({e})"
    else: why = "Chromium is not installed"
    if b is None:
        if os.environ.get("CI"): pytest.fail(f"{why}; CI must run the browser test (.ci/run installs chromium)")
        pytest.skip(f"{why}: install it (Debian/Ubuntu: apt-get install chromium) to run the browser test")
    yield b
    b.close()


LAST = "Array.from(document.querySelectorAll('#log .{} .text')).pop()?.textContent"
DONE = "document.body.dataset.state === 'idle' && /finish/.test(document.getElementById('status').textContent)"


def test_page_chat_multi_turn_in_chinese(browser, chat):
    assert chat.name == "tiny-chat"                                  # --name
    browser.open(chat.url + "/")
    assert browser.js("document.getElementById('mode').textContent") == "chat"
    browser.set(temperature=0, max_tokens=10, repetition_penalty=1, top_p=1)
    messages = []
    for question, answer in TALK[:2]:
        browser.type(question)
        browser.wait(DONE)
        shown = browser.js(LAST.format("assistant"))
        messages.append({"role": "user", "content": question})
        api = chat.http.post("/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 10,
                                                           "repetition_penalty": 1}).json()
        assert shown == api["choices"][0]["message"]["content"] == answer   # the 2nd needs the 1st in the prompt
        messages.append({"role": "assistant", "content": shown})
    if path := os.environ.get("GPT2_SCREENSHOT"):                 # e.g. nbs/images/serve.png, for the README
        Path(path).write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    browser.type("长" * 501)                                         # refused (--max-chars 500): said on the page,
    browser.wait("document.body.dataset.state === 'idle'")            # and the turn leaves the history
    assert "501 characters" in browser.js(LAST.format("error"))
    browser.type(TALK[2][0])
    browser.wait(DONE)
    assert browser.js(LAST.format("assistant")) == TALK[2][1]        # needs exactly the two exchanges before it
    browser.type("<b>粗体</b><script>x=1</script>")                  # shown as text, never as HTML
    browser.wait("document.body.dataset.state === 'idle'")
    assert browser.js(LAST.format("user")) == "<b>粗体</b><script>x=1</script>"
    assert browser.js("document.querySelector('#log b, #log script') === null && typeof x === 'undefined'")


def test_page_completion_equals_api_and_stop_stops_the_server(browser, zh):
    browser.open(zh.url + "/")
    assert browser.js("document.getElementById('mode').textContent").startswith("completion")
    browser.set(temperature=0, max_tokens=40, repetition_penalty=1.3, top_p=1)
    browser.type("北京今天")
    browser.wait(DONE)
    api = zh.http.post("/v1/completions", json={"prompt": "北京今天", "temperature": 0, "max_tokens": 40,
                                                 "repetition_penalty": 1.3}).json()["choices"][0]["text"]
    assert browser.js(LAST.format("completion")) == api and api
    served = zh.http.get("/health").json()["served"]
    browser.set(max_tokens=MAX_TOKENS)
    browser.type("人民")
    # the answer streams in: text on the page while the server is still generating
    browser.wait(f"document.body.dataset.state === 'streaming' && ({LAST.format('completion')} || '').length > 0")
    browser.js("document.getElementById('stop').click()")
    browser.wait("document.body.dataset.state === 'idle'")
    assert browser.js("document.getElementById('status').textContent") == "stopped"
    deadline = time.monotonic() + 20
    while (h := zh.http.get("/health").json())["served"] == served:
        assert time.monotonic() < deadline, "the generation did not end"
        time.sleep(0.05)
    job = h["recent"][-1]
    assert job["finish"] == "cancelled" and job["tokens"] < MAX_TOKENS and job["tokens_after_cancel"] <= 1, job


def test_page_sse_reader_keeps_split_lines_and_characters(browser, zh):
    "The page's SSE reader against bytes cut everywhere: inside lines, events and UTF-8 characters."
    browser.open(zh.url + "/")
    script = """(async (size) => {
      const bytes = new TextEncoder().encode('data: {"choices":[{"text":"北京"}]}\\n\\n: comment\\n' +
                                             'data: {"choices":[{"text":"你好，世界"}]}\\r\\n\\ndata: [DONE]\\n\\n');
      const body = new ReadableStream({ start(c) {
        for (let i = 0; i < bytes.length; i += size) c.enqueue(bytes.slice(i, i + size));
        c.close(); } });
      const got = [];
      const done = await readEvents(new Response(body), (ev) => got.push(ev.choices[0].text));
      return JSON.stringify([done, got]);
    })(SIZE)"""
    for size in (1, 2, 4, 5, 7, 1000):
        assert json.loads(browser.js(script.replace("SIZE", str(size)))) == [True, ["北京", "你好，世界"]], size


def test_page_drops_oldest_exchange_to_stay_within_context(browser, ckpts, env, tmp_path):
    s = Server(["--checkpoint", ckpts["chat-long"]], env, tmp_path / "chat-long.log")
    try:
        browser.open(s.url + "/")
        browser.set(temperature=0, max_tokens=16, repetition_penalty=1, top_p=1)
        for (question, answer), dropped in zip(LONG_TALK, (False, False, True)):
            browser.type(question)
            browser.wait(DONE)
            assert browser.js(LAST.format("assistant")) == answer        # the 3rd: only without the 1st exchange
            status = browser.js("document.getElementById('status').textContent")
            assert ("dropped the 1 oldest exchange" in status) == dropped, status
    finally: s.stop()
