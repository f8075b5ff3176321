"""Benchmark prompts of a given size in the model's own tokens, and the tokenizer that measures them.

Every prompt is English prose drawn from a fixed set of sentences, shuffled by a seed, and opened by a
tag unique to its workload, run and job: no two jobs share more than the chat template's opening (a
prefix cache can only help where a workload means it to), and the same command builds the same
prompts on every machine.
"""

from __future__ import annotations

import random
from typing import Any

SENTENCES = (
    "Small language models now run on single-board computers that cost less than a good pair of shoes.",
    "The Rockchip RK3588 has four big Cortex-A76 cores, four little Cortex-A55 cores and a neural "
    "processing unit rated at six trillion operations per second.",
    "When a model generates a token, every weight has to be read from memory once, so decode speed is "
    "bounded by memory bandwidth rather than by arithmetic.",
    "Prefill is different: the whole prompt is processed as one batch of matrix multiplications, and "
    "the cores are busy computing instead of waiting for memory.",
    "A four-bit quantized model with one and a half billion parameters needs a little over a gigabyte, "
    "which fits comfortably next to the operating system on an eight gigabyte board.",
    "Thermal throttling is the quiet enemy of long benchmarks in closed plastic enclosures.",
    "A board that runs at full clock for the first minute may lose a third of its speed after ten "
    "minutes unless it has a heatsink and a fan.",
    "The scheduler of the operating system may move a busy thread from a big core to a little one, "
    "and the slowest thread decides how long each token takes.",
    "Pinning the inference threads to the big cores usually helps more than adding threads.",
    "A fleet of devices in a factory hall reports its temperature, its queue and its tokens per second "
    "to a central broker every few seconds.",
    "Operators want to know which device is slow, which is hot and which has stopped answering.",
    "The key-value cache grows with every token of context and is the largest piece of memory that "
    "is not part of the weights.",
    "Two thousand tokens of context for a model of this size take about fifty megabytes of cache.",
    "Reusing the cache of a shared prompt prefix saves the time of processing it again.",
    "Chat templates wrap each message in markers that tell the model who is speaking.",
    "A reasoning model first writes its thoughts between think tags and then gives the answer.",
    "Sampling with a temperature of zero always picks the most likely token, which makes runs repeatable.",
    "Benchmarks should report the mean and the standard deviation of several runs, because a single "
    "run can be disturbed by anything else the machine is doing.",
    "Time to first token is what a person notices first when asking a question.",
    "Tokens per second during decoding decide how long the rest of the answer takes to appear.",
    "A daemon that serves one model to several local programs must queue their requests fairly and "
    "refuse new ones when the queue is full.",
    "Each request carries a deadline, and a request that waits too long is answered with an error "
    "instead of being processed late.",
    "The socket of the daemon is only readable by the users of one group, so no other program on the "
    "board can use the model.",
    "Logs are written as one JSON object per line so that they can be searched later.",
    "The model file is checked when the daemon starts, and a broken file is reported with its path.",
    "Batching several sequences together uses the cores better than running them one after another.",
    "Continuous batching adds a new request to the running batch as soon as a slot becomes free.",
    "On a board with little memory, every megabyte that the daemon itself uses is a megabyte the "
    "cache cannot have.",
    "The same model may answer a sensor that asks whether a room is too warm and a person who asks "
    "for a summary of a long report.",
    "Short questions with long shared instructions are common, and they are where a prefix cache pays "
    "off most.",
    "Power consumption matters as much as speed for devices that run from a battery or a solar panel.",
    "A little core draws a fraction of the power of a big one but also runs several times slower.",
    "Measurements on one machine are compared as ratios, because absolute speeds change from one "
    "machine to the next.",
    "The reference implementation is the plain library called in the same process with the same settings.",
    "Any difference between the daemon and the library is the price of the queue, the socket and the "
    "streaming of the answer.",
    "A good daemon costs a few percent at most and makes up for it when several requests arrive at once.",
    "Restarting the daemon should not throw away the work of processing a long shared prompt.",
    "A cache on disk can bring the state of a prompt back in a fraction of the time it took to compute.",
    "Tests run against the real library, the real model and the real socket, not against imitations.",
    "Every wait in a test is bounded, so a broken daemon fails the test instead of hanging it.",
)

QUESTIONS = (
    "What limits decode speed on such a board?",
    "Summarise the text above in two sentences.",
    "Which part of the text is about memory?",
    "Why should benchmarks report several runs?",
    "What does a prefix cache save?",
    "How can thermal throttling be avoided?",
    "What is time to first token?",
    "Why are threads pinned to the big cores?",
    "What happens to a request that waits too long?",
    "Why is continuous batching useful?",
)


class ChatTokenizer:
    """A loaded ``llama_cpp.Llama``'s tokenizer and chat template, rendered as edged and llama-server do."""

    def __init__(self, llm: Any) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError("the model has no chat template (tokenizer.chat_template)")
        self.formatter = Jinja2ChatFormatter(
            template=template,
            bos_token=self._special_text(llm.token_bos()),
            eos_token=self._special_text(llm.token_eos()),
        )

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self.llm.detokenize([token], special=True)).decode("utf-8", errors="replace")

    def render(self, user: str) -> str:
        return str(self.formatter(messages=[{"role": "user", "content": user}]).prompt)

    def tokenize(self, text: str) -> list[int]:
        """Text as the template rendered it: its markers are special tokens, its BOS is its own."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def chat_tokens(self, user: str) -> list[int]:
        return self.tokenize(self.render(user))

    def text(self, tokens: list[int]) -> str:
        return bytes(self.llm.detokenize(tokens)).decode("utf-8", errors="ignore")


def document(tokenizer: ChatTokenizer, tag: str, n_tokens: int, *, chat: bool = True) -> str:
    """User text of about ``n_tokens`` tokens (the whole chat prompt when ``chat``, else the text alone)."""
    overhead = len(tokenizer.chat_tokens("")) if chat else 0
    budget = max(n_tokens - overhead, 8)
    rng = random.Random(tag)
    sentences: list[str] = []
    text = f"Report {tag}."
    while len(tokenizer.tokenize(text)) < budget + 8:
        if not sentences:
            sentences = list(SENTENCES)
            rng.shuffle(sentences)
        text += " " + sentences.pop()
    return tokenizer.text(tokenizer.tokenize(text)[:budget]).rstrip()


def question(index: int) -> str:
    return QUESTIONS[index % len(QUESTIONS)]
