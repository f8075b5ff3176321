"""`edged.backends.llamacpp.facts_of`: llama.cpp's one-line model description, as typed facts."""

from __future__ import annotations

from edged.backends.base import ModelFacts
from edged.backends.llamacpp import facts_of


def test_the_description_is_architecture_size_and_quantization() -> None:
    facts = facts_of(
        "qwen2 1.5B Q4_K - Medium", parameters=1_543_714_304, file_bytes=986_048_000, chat_template=True
    )
    assert facts == ModelFacts(
        format="gguf",
        family="qwen2",
        parameter_size="1.5B",
        quantization="Q4_K - Medium",
        parameters=1_543_714_304,
        file_bytes=986_048_000,
        description="qwen2 1.5B Q4_K - Medium",
        chat_template=True,
    )


def test_a_short_or_empty_description_leaves_the_rest_empty() -> None:
    short = facts_of("llama", parameters=0, file_bytes=0, chat_template=False)
    assert (short.family, short.parameter_size, short.quantization) == ("llama", "", "")
    empty = facts_of("", parameters=0, file_bytes=0, chat_template=False)
    assert (empty.family, empty.parameter_size, empty.quantization) == ("", "", "")
