"""Measures gpt2-serve against the REPL on one model: time to first token and tokens/s of one streamed completion
through the HTTP API vs the REPL's own figure (`Session`, the numbers behind its `[N tokens, X tokens/s]` line),
measured back-to-back and alternated; then aggregate tokens/s with 1, 4 and 8 concurrent streaming clients.

    .venv/bin/python scripts/serve_bench.py --checkpoint model/RUN [--tokens 100] [--rounds 5] [--threads 1]

Prints a markdown table. Greedy decoding, so both paths write the same tokens."""
import argparse, json, os, re, statistics, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

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
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for the REPL and the server")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, enc, source = load_model(a.checkpoint, dtype="auto")
    dtype, med = model.inference_dtype, statistics.median
    session = Session(model, enc, Settings(temperature=0, max_new_tokens=a.tokens))

    def repl_rounds() -> tuple[list[float], list[float]]:
        "The REPL's figures, with no server process alive (its idle threads would compete for the cores)."
        speed, ttft = [], []
        session.complete(PROMPTS[0])                                                  # warm-up
        for i in range(a.rounds):
            t0, first = time.perf_counter(), None
            for _ in session.stream(PROMPTS[i % 8]):
                if first is None: first = time.perf_counter() - t0
            speed.append(session.n_tokens / session.seconds); ttft.append(first)
        return speed, ttft

    before, ttft_repl = repl_rounds()
    server = subprocess.Popen([sys.executable, "-m", "gpt2_demo.serve", "--checkpoint", a.checkpoint, "--port", "0",
                               "--dtype", dtype], stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
    for line in server.stderr:
        if m := re.search(r"at (http://127\.0\.0\.1:\d+)/ ", line): break
    url = m.group(1)
    try:
        api_stream(url, PROMPTS[0], a.tokens)                                        # warm-up
        api, ttft_api = [], []
        for i in range(a.rounds):
            n, first, total = api_stream(url, PROMPTS[i % 8], a.tokens)
            api.append(n / total); ttft_api.append(first)
        rows = []
        for k in (1, 4, 8):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(k) as pool:
                runs = list(pool.map(lambda i: api_stream(url, PROMPTS[i % 8], a.tokens), range(k)))
            wall = time.perf_counter() - t0
            rows.append((k, sum(r[0] for r in runs) / wall, statistics.mean(r[1] for r in runs)))
    finally:
        server.terminate(); server.wait(timeout=10)
    after, _ = repl_rounds()
    repl = med(before + after)
    print(f"model: {source}, dtype {dtype}; {a.tokens} new tokens, greedy, median of {a.rounds} "
          f"(REPL: {a.rounds} before and {a.rounds} after the server ran); {a.threads} thread(s)\n")
    print("| path | time to first token | tokens/s |\n|---|---|---|")
    print(f"| REPL (`Session`, in process) | {med(ttft_repl) * 1000:.0f} ms | {repl:.1f} |")
    print(f"| HTTP API, streamed | {med(ttft_api) * 1000:.0f} ms | {med(api):.1f} |")
    print(f"\nHTTP / REPL throughput: {med(api) / repl:.3f} (REPL before {med(before):.1f}, after {med(after):.1f})\n")
    print("| concurrent clients | aggregate tokens/s | mean time to first token |\n|---|---|---|")
    for k, agg, ttft in rows: print(f"| {k} | {agg:.1f} | {ttft * 1000:.0f} ms |")

if __name__ == "__main__": main()
