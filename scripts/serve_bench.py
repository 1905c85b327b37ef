"""Measures gpt2-serve against the REPL on one model: time to first token and tokens/s of one streamed completion
through the HTTP API vs the REPL's own figure (`Session`, the numbers behind its `[N tokens, X tokens/s]` line),
measured back-to-back and alternated; then aggregate tokens/s with 1, 4 and 8 concurrent streaming clients.

    .venv/bin/python scripts/serve_bench.py --checkpoint model/RUN [--tokens 100] [--rounds 5]

Prints a markdown table. Greedy decoding, so both paths write the same tokens."""
import argparse, json, re, statistics, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor

import httpx

from gpt2_demo.interactive import Session, Settings, load_model

PROMPTS = ["北京今天", "人民日报报道", "新年到了", "人民群众", "今天天气", "我们的祖国", "经济发展", "中国"]


def api_stream(url: str, prompt: str, n: int) -> tuple[int, float, float]:
    "(tokens, seconds to the first text, seconds in all) of one streamed greedy completion."
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300, trust_env=False) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"): continue
            ev = json.loads(line[6:])
            if ev["choices"] and ev["choices"][0]["text"] and first is None: first = time.perf_counter() - t0
            if ev.get("usage"): tokens = ev["usage"]["completion_tokens"]
    return tokens, first, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    model, enc, source = load_model(a.checkpoint, dtype="auto")
    dtype = model.inference_dtype
    server = subprocess.Popen([sys.executable, "-m", "gpt2_demo.serve", "--checkpoint", a.checkpoint, "--port", "0",
                               "--dtype", dtype], stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if m := re.search(r"at (http://127\.0\.0\.1:\d+)/ ", line): break
    url = m.group(1)
    try:
        session = Session(model, enc, Settings(temperature=0, max_new_tokens=a.tokens))
        api_stream(url, PROMPTS[0], a.tokens); session.complete(PROMPTS[0])          # warm-up, both
        repl, api, ttft_repl, ttft_api = [], [], [], []
        for i in range(a.rounds):                                                   # alternated, back to back
            t0, first = time.perf_counter(), None
            for _ in session.stream(PROMPTS[i % 8]):
                if first is None: first = time.perf_counter() - t0
            repl.append(session.n_tokens / session.seconds); ttft_repl.append(first)
            n, first, total = api_stream(url, PROMPTS[i % 8], a.tokens)
            api.append(n / total); ttft_api.append(first)
        med = statistics.median
        print(f"model: {source}, dtype {dtype}; {a.tokens} new tokens, greedy, median of {a.rounds}\n")
        print("| path | time to first token | tokens/s |\n|---|---|---|")
        print(f"| REPL (`Session`, in process) | {med(ttft_repl) * 1000:.0f} ms | {med(repl):.1f} |")
        print(f"| HTTP API, streamed | {med(ttft_api) * 1000:.0f} ms | {med(api):.1f} |")
        print(f"\nHTTP / REPL throughput: {med(api) / med(repl):.3f}\n")
        print("| concurrent clients | aggregate tokens/s | per client tokens/s |\n|---|---|---|")
        for k in (1, 4, 8):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(k) as pool:
                runs = list(pool.map(lambda i: api_stream(url, PROMPTS[i % 8], a.tokens), range(k)))
            wall = time.perf_counter() - t0
            total = sum(r[0] for r in runs)
            print(f"| {k} | {total / wall:.1f} | {statistics.mean(r[0] / r[2] for r in runs):.1f} |")
    finally:
        server.terminate(); server.wait(timeout=10)


if __name__ == "__main__": main()
