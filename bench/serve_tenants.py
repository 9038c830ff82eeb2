"""One tenant against another on ``bca-deploy serve``: an honest client's latency alone and beside each attack.

Setup: the MiniLM adapter bank of ``bench/serve_api.py`` (all-MiniLM-L6-v2, ``--adapters`` BCA adapters on
query/value, block size 64, exported with ``export --bank``), served by the real CLI (``python -m
bca_deploy.cli serve``) in a child process on 127.0.0.1 with the default limits, once per ``--batch-tokens`` value
of ``--max-batch-tokens`` (8192, the default until 2026-12-06, and 2048, the default since).

The honest client (this process, one keep-alive connection) sends one SST-2 sentence at a time to ``POST
/v1/embeddings`` for adapter ``a01`` for ``--seconds``: first alone, then beside each attack, run by
``--attackers`` clients in another process (looping for as long):

- ``json-values``: a 4 MiB body of 1.4 million ``{}`` in an extra field (under every limit; refused 422 once parsed);
- ``long-texts``: 118 texts of 32 KB each, legal, each truncated to 512 tokens (3.9 MB to tokenize, and rows padded
  to 512 tokens);
- ``many-small``: a busy tenant of another adapter, 8 connections sending one-text requests back to back.

For each: the honest client's requests, latency p50/p99/max, p50 and p99 over the same figures alone, and whether
every answer equals the one it got alone (max |difference| of the embedding, tolerance 1e-5: batches are
padded differently). Writes ``bench/results/serve_tenants.json`` and ``.md``.

    cd /work/main && python3 bench/serve_tenants.py            # ~3 min on 2 cores
    cd /work/main && python3 bench/serve_tenants.py --quick    # smoke run (3 s per scenario), writes nothing
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentile  # noqa: E402
from serve import sst2_sentences  # noqa: E402
from serve_api import Served, make_export  # noqa: E402

ATTACKS = ("json-values", "long-texts", "many-small")
HONEST_ADAPTER = "a01"


def attack_body(kind: str) -> bytes:
    if kind == "json-values":
        values = "[" + ",".join(["{}"] * ((4 * 1024 * 1024 - 200) // 3)) + "]"
        return ('{"input": "x", "adapter": "a00", "metadata": %s}' % values).encode()
    if kind == "long-texts":
        words = ("the cat is on the mat " * 2000)[:32760]
        return json.dumps({"input": [words] * 118, "adapter": "a00"}).encode()
    return json.dumps({"input": "a small request of another tenant", "adapter": "a00"}).encode()


def attacker_main(kind: str, port: int, seconds: float, clients: int) -> None:
    """``clients`` connections sending ``kind`` bodies back to back for ``seconds``; prints what they got."""
    body = attack_body(kind)
    statuses: list[int] = []

    def loop() -> None:
        end = time.monotonic() + seconds
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while time.monotonic() < end:
            try:
                conn.request("POST", "/v1/embeddings", body, {"content-type": "application/json"})
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.close()

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"requests": len(statuses), "statuses": sorted(set(statuses))}))


def honest(port: int, sentences: list[str], seconds: float, reference: dict[str, list[float]] | None):
    """One connection, one sentence per request for ``seconds``: (latencies in ms, answers, max |diff| vs reference)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    latencies, answers, worst, failures = [], {}, 0.0, []
    end, i = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        sentence = sentences[i % len(sentences)]
        i += 1
        body = json.dumps({"input": sentence, "adapter": HONEST_ADAPTER, "normalize": True})
        start = time.perf_counter()
        conn.request("POST", "/v1/embeddings", body, {"content-type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        latencies.append((time.perf_counter() - start) * 1000)
        if response.status != 200:
            failures.append(response.status)
            continue
        vector = json.loads(payload)["data"][0]["embedding"]
        answers[sentence] = vector
        if reference is not None and sentence in reference:
            worst = max(worst, max(abs(a - b) for a, b in zip(vector, reference[sentence], strict=True)))
    conn.close()
    return latencies, answers, worst, failures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attack", choices=ATTACKS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=15.0, help="per scenario")
    parser.add_argument("--attackers", type=int, default=2, help="attacking connections (many-small: 8)")
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="the server's onnxruntime intra-op threads")
    parser.add_argument("--batch-tokens", default="8192,2048",
                        help="the servers' --max-batch-tokens, one server each (2048: the default)")
    parser.add_argument("--out", default="serve_tenants", help="results name under bench/results/")
    parser.add_argument("--quick", action="store_true", help="3 s per scenario, nothing written")
    args = parser.parse_args(argv)
    if args.attack:
        clients = 8 if args.attack == "many-small" else args.attackers
        return attacker_main(args.attack, args.port, args.seconds, clients)
    if args.quick:
        args.seconds = 3.0
    sentences = sst2_sentences()[:64]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bca-serve-tenants-") as tmp:
        work = Path(tmp)
        print("exporting the MiniLM bank ...", flush=True)
        onnx, store, _ = make_export(work, args.adapters)
        load_before = os.getloadavg()
        for budget in [int(b) for b in args.batch_tokens.split(",")]:
            with Served(onnx, store, work / f"server-{budget}.log", "--threads", str(args.threads),
                        "--max-batch-tokens", str(budget)) as server:
                honest(server.port, sentences, 2.0, None)  # warm-up
                alone, reference, _, _ = honest(server.port, sentences, args.seconds, None)
                rows.append(_row(budget, "alone", alone, alone, 0.0, [], None))
                print(rows[-1], flush=True)
                for kind in ATTACKS:
                    attacker = subprocess.Popen([sys.executable, __file__, "--attack", kind, "--port",
                                                 str(server.port), "--seconds", str(args.seconds + 1), "--attackers",
                                                 str(args.attackers)], stdout=subprocess.PIPE, text=True)
                    time.sleep(1.0)  # the attack is under way
                    latencies, _, worst, failures = honest(server.port, sentences, args.seconds, reference)
                    out, _ = attacker.communicate(timeout=900)
                    rows.append(_row(budget, kind, latencies, alone, worst, failures,
                                     json.loads(out.strip().splitlines()[-1])))
                    print(rows[-1], flush=True)
        load_after = os.getloadavg()
    if args.quick:
        return
    from common import write_results

    notes = (f"Honest client: one keep-alive connection, one SST-2 sentence per request to /v1/embeddings (adapter "
             f"{HONEST_ADAPTER}), {args.seconds:g} s per scenario; attackers in another process ({args.attackers} "
             f"connections; many-small: 8). Server: `bca-deploy serve` defaults, --threads {args.threads}. "
             "`p50_vs_alone`/`p99_vs_alone`: the honest latency over its latency alone, same run. `max_abs_diff`: "
             "the honest answers against the same sentences' answers alone. A long-texts batch (16 rows of 512 "
             "tokens at --max-batch-tokens 8192, 4 at the default 2048) runs for as long as it takes; the honest "
             "rows run in batches of their own but wait for the one running: --max-batch-tokens bounds that wait. "
             f"Load average before/after: {load_before} / "
             f"{load_after}.")
    write_results(args.out, rows, title="bca-deploy serve: one tenant against another",
                  notes=notes)


def _row(budget: int, scenario: str, latencies: list[float], alone: list[float], worst: float, failures: list[int],
         attacker: dict | None) -> dict:
    p50, p99 = statistics.median(latencies), percentile(latencies, 99)
    a50, a99 = statistics.median(alone), percentile(alone, 99)
    return {"max_batch_tokens": budget, "scenario": scenario, "honest_requests": len(latencies),
            "p50_ms": round(p50, 1), "p99_ms": round(p99, 1), "max_ms": round(max(latencies), 1),
            "p50_vs_alone": round(p50 / a50, 2), "p99_vs_alone": round(p99 / a99, 2),
            "honest_failures": len(failures), "max_abs_diff": worst,
            "attacker_requests": None if attacker is None else attacker["requests"],
            "attacker_statuses": None if attacker is None else attacker["statuses"]}


if __name__ == "__main__":
    main()
