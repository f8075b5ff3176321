"""The baseline: llama-cpp-python called in this process, with the settings edged gives llama.cpp.

Same model file, n_ctx 2048, the same threads, the same chat-templated prompt tokens, greedy
sampling, no stop at end-of-text (``Llama.generate`` never stops by itself). The KV cache is cleared
before every job, so each one pays its full prefill. A single ``Llama`` holds one sequence: jobs
submitted together run one after another, each waiting for those before it (that wait is in its TTFT).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from edged.bench.jobs import BenchError, Job, JobSample
from edged.bench.prompts import ChatTokenizer

N_CTX = 2048
N_BATCH = 512


class RawTarget:
    name = "raw"

    def __init__(self, model: Path, threads: int) -> None:
        self.model = model
        self.threads = threads
        self.notes = [
            "llama-cpp-python in the benchmark's own process; concurrent jobs run one after another"
        ]
        self.llm: Any = None
        self.tokenizer: ChatTokenizer | None = None

    def start(self) -> float:
        """Load the model; the seconds `Llama()` took (raw's start-up: this process runs already, with
        llama_cpp imported)."""
        import llama_cpp

        began = time.perf_counter()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(self.model),
                n_ctx=N_CTX,
                n_batch=N_BATCH,
                n_ubatch=N_BATCH,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                verbose=False,
            )
        except ValueError as exc:  # llama-cpp-python's way of saying llama.cpp returned NULL
            raise BenchError(f"llama-cpp-python could not load {self.model}: {exc}") from exc
        seconds = time.perf_counter() - began
        self.tokenizer = ChatTokenizer(self.llm)
        return seconds

    def start_again(self) -> float:
        """Close the model and load it again (a new tokenizer too); seconds `Llama()` took."""
        self.close()
        return self.start()

    def pid(self) -> int | None:
        return os.getpid()

    def run(self, jobs: list[Job]) -> list[JobSample]:
        t_submit = time.perf_counter()
        return [self._one(job, t_submit) for job in jobs]

    def _one(self, job: Job, t_submit: float) -> JobSample:
        assert self.tokenizer is not None, "start() first"
        llm = self.llm
        tokens = self.tokenizer.chat_tokens(job.user)
        llm.reset()  # no prefix reuse: n_tokens 0 makes generate() evaluate the whole prompt
        t_start = time.perf_counter()
        t_first = t_last = t_start
        n = 0
        pieces: list[bytes] = []
        for token in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            pieces.append(llm.detokenize([token]))  # a server turns every token into text too
            t_last = time.perf_counter()
            if n == 0:
                t_first = t_last
            n += 1
            if n >= job.max_tokens:
                break
        t_done = time.perf_counter()
        prefill_s = t_first - t_start
        return JobSample(
            t_submit=t_submit,
            t_start=t_start,
            t_first=t_first,
            t_last=t_last,
            t_done=t_done,
            prompt_tokens=len(tokens),
            completion_tokens=n,
            prefill_tok_s=len(tokens) / prefill_s if prefill_s > 0 else None,
        )

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
