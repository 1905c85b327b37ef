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


def api_stream(http: httpx.Client, prompt: str, n: int) -> tuple[int, float, float]:
    "(tokens, seconds to the first text, seconds in all) of one streamed greedy completion."
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, tokens = time.perf_counter(), None, 0
    with http.stream("POST", "/v1/completions", json=body) as r:
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

    def repl_round(prompt: str) -> tuple[float, float]:
        "(tokens/s, seconds to the first text) of one REPL completion."
        t0, first = time.perf_counter(), None
        for _ in session.stream(prompt):
            if first is None: first = time.perf_counter() - t0
        return session.n_tokens / session.seconds, first

    # one thread each, so the idle process has no spinning thread team taking the core from the busy one
    server = subprocess.Popen([sys.executable, "-m", "gpt2_demo.serve", "--checkpoint", a.checkpoint, "--port", "0",
                               "--dtype", dtype], stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
    for line in server.stderr:
        if m := re.search(r"at (http://127\.0\.0\.1:\d+)/ ", line): break
    clients = [httpx.Client(base_url=m.group(1), timeout=300, trust_env=False) for _ in range(8)]
    try:
        api_stream(clients[0], PROMPTS[0], a.tokens); repl_round(PROMPTS[0])        # warm-up, both
        repl, api = [], []
        for i in range(a.rounds):                                                   # alternated, back to back
            repl.append(repl_round(PROMPTS[i % 8]))
            n, first, total = api_stream(clients[0], PROMPTS[i % 8], a.tokens)
            job = clients[0].get("/health").json()["recent"][-1]                 # the server's own timing
            api.append((n / total, first, job["tokens"] / job["seconds"]))
        rows = []
        for k in (1, 4, 8):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(k) as pool:
                runs = list(pool.map(lambda i: api_stream(clients[i], PROMPTS[i % 8], a.tokens), range(k)))
            wall = time.perf_counter() - t0
            rows.append((k, sum(r[0] for r in runs) / wall, statistics.mean(r[1] for r in runs)))
    finally:
        server.terminate(); server.wait(timeout=10)
    speed = lambda rows, k=0: med(r[k] for r in rows)
    best = lambda rows: max(r[0] for r in rows)
    ttft = lambda rows: med(r[1] for r in rows) * 1000
    print(f"model: {source}, dtype {dtype}; {a.tokens} new tokens, greedy, median of {a.rounds} alternated rounds; "
          f"{a.threads} thread(s)\n")
    print("| path | time to first token | tokens/s (median) | tokens/s (best) |\n|---|---|---|---|")
    print(f"| REPL (`Session`, in process) | {ttft(repl):.0f} ms | {speed(repl):.1f} | {best(repl):.1f} |")
    print(f"| HTTP API, streamed (`httpx`, kept-alive connection) | {ttft(api):.0f} ms | {speed(api):.1f} | "
          f"{best(api):.1f} |")
    print(f"\nHTTP / REPL throughput: {speed(api) / speed(repl):.3f} (medians), {best(api) / best(repl):.3f} (bests); "
          f"the server's generation thread alone: {speed(api, 2):.1f} tokens/s (median)\n")
    print("| concurrent clients | aggregate tokens/s | mean time to first token |\n|---|---|---|")
    for k, agg, first in rows: print(f"| {k} | {agg:.1f} | {first * 1000:.0f} ms |")

if __name__ == "__main__": main()
