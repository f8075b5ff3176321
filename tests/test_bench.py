"""`edged bench`: the synthetic R1-shaped model (a 2-layer variant, built by the real command and loaded by
the real llama.cpp) and the benchmark end to end against the real daemon and raw llama-cpp-python.

Speeds are never asserted: only that every figure exists and that the figures agree with each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import BOARDS, clean_env

from edged.bench.prompts import ChatTokenizer, document
from edged.bench.vocab import BOS_ID, EOS_ID, SPECIAL_TOKENS, VOCAB_SIZE, load_words

pytestmark = pytest.mark.system

ENGLISH = (
    "The board runs a small language model for the sensors in the hall. When the room gets too warm, "
    "the model writes a short report and sends it to the people who look after the machines."
)


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged.bench", *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_model(r1_tiny: Path) -> Path:
    """The session's 2-layer R1-shaped model (conftest builds it with `edged bench synth-model`)."""
    return r1_tiny


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Any:
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(tiny_model), n_ctx=512, n_threads=2, verbose=False)
    yield model
    model.close()


def test_synth_model_has_r1_shapes_and_tokenizer(tiny_model: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(tiny_model))

    def scalar(key: str) -> Any:
        field = reader.fields[key]
        return field.parts[field.data[0]][0]

    def text(key: str) -> str:
        field = reader.fields[key]
        return bytes(field.parts[field.data[0]]).decode()

    assert text("general.architecture") == "qwen2"
    assert scalar("qwen2.block_count") == 2
    assert scalar("qwen2.embedding_length") == 1536
    assert scalar("qwen2.attention.head_count") == 12
    assert scalar("qwen2.attention.head_count_kv") == 2
    assert scalar("qwen2.feed_forward_length") == 8960
    assert text("tokenizer.ggml.model") == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == VOCAB_SIZE
    assert len(reader.fields["tokenizer.ggml.merges"].data) > 100_000
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors  # untied, as in R1-Distill-Qwen-1.5B
    assert list(tensors["token_embd.weight"].shape) == [1536, VOCAB_SIZE]
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [8960, 1536]
    assert tensors["blk.0.ffn_gate.weight"].tensor_type.name == "Q4_K"
    assert "blk.2.attn_q.weight" not in tensors


def test_synth_model_tokenizes_english_into_words(llm: Any) -> None:
    tokens = llm.tokenize(ENGLISH.encode(), add_bos=False, special=True)
    words = len(ENGLISH.split())
    assert len(tokens) < len(ENGLISH.encode()) / 3
    assert len(tokens) <= words * 1.3, [llm.detokenize([t]) for t in tokens]
    assert llm.detokenize(tokens).decode() == ENGLISH
    # Every listed word is one token, led by a space, capitalised or bare (llama.cpp's BPE, not ours).
    for word in load_words()[::400]:
        for form in (" " + word, " " + word.capitalize(), word.capitalize(), word):
            assert len(llm.tokenize(form.encode(), add_bos=False, special=False)) == 1, form


def test_synth_model_special_tokens_and_chat_template(llm: Any) -> None:
    assert llm.token_bos() == BOS_ID
    assert llm.token_eos() == EOS_ID
    for token_id, text in SPECIAL_TOKENS.items():
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == [token_id]
    rendered = ChatTokenizer(llm).render("Hello")
    bos, user, assistant = SPECIAL_TOKENS[BOS_ID], SPECIAL_TOKENS[151644], SPECIAL_TOKENS[151645]
    assert rendered == f"{bos}{user}Hello{assistant}<think>\n"
    tokens = ChatTokenizer(llm).chat_tokens("Hello")
    assert tokens[:2] == [BOS_ID, 151644]
    assert tokens[-3:-1] == [151645, 151648]


def test_synth_model_generates(llm: Any) -> None:
    prompt = ChatTokenizer(llm).chat_tokens("Why is the sky blue?")
    generated = []
    for token in llm.generate(prompt, temp=0.0):
        generated.append(token)
        if len(generated) == 6:
            break
    assert len(generated) == 6
    assert all(0 <= t < VOCAB_SIZE for t in generated)


def test_prompts_have_the_asked_token_count(llm: Any) -> None:
    tokenizer = ChatTokenizer(llm)
    for size in (128, 400):
        n = len(tokenizer.chat_tokens(document(tokenizer, "size", size)))
        assert abs(n - size) <= 4, n
    assert document(tokenizer, "a", 128) != document(tokenizer, "b", 128)
    assert document(tokenizer, "a", 128) == document(tokenizer, "a", 128)


def test_synth_model_refuses_to_overwrite_without_force(tiny_model: Path) -> None:
    before = tiny_model.stat().st_mtime_ns
    done = bench("synth-model", "-o", str(tiny_model), "--layers", "2")
    assert done.returncode == 1
    assert "--force" in done.stderr
    assert tiny_model.stat().st_mtime_ns == before


def test_synth_model_without_gguf_says_how_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['gguf'] = None\n"  # as if the package were not installed
        "from edged.bench.cli import bench_app\n"
        f"bench_app(['synth-model', '-o', {str(tmp_path / 'x.gguf')!r}], prog_name='edged bench')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "pip install 'edged[bench]'" in done.stderr
    assert not (tmp_path / "x.gguf").exists()


def daemon_env(tmp_path: Path) -> list[str]:
    """The daemon as the other tests run it: a fixture board, no board profiles of the machine's own."""
    (tmp_path / "profiles").mkdir()
    pairs = {
        "EDGED_BOARD__ROOT": str(BOARDS / "x86"),
        "EDGED_BOARD__PROFILES_DIR": str(tmp_path / "profiles"),
    }
    return [arg for key, value in pairs.items() for arg in ("--edged-env", f"{key}={value}")]


def test_bench_json_edged_against_raw(tmp_path: Path, model_path: Path) -> None:
    done = bench(
        "--runs", "2",
        "--workload", "seeds",
        "--workload", "concurrent",
        "--concurrency", "2",
        "--max-tokens", "8",
        "--json",
        *daemon_env(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"]["path"] == str(model_path)
    assert report["model"]["size_bytes"] == model_path.stat().st_size
    assert report["machine"]["cpu_model"]
    assert report["machine"]["llama_cpp_python"] == "0.3.36"
    assert report["runs"] == 2
    assert report["slots"] == 2
    assert [t["name"] for t in report["targets"]] == ["edged", "raw"]
    workloads = {w["name"]: w for w in report["workloads"]}
    assert list(workloads) == ["seeds", "concurrent"]
    assert workloads["concurrent"]["jobs_per_run"] == 2
    for workload in workloads.values():
        assert workload["generated_tokens_per_job"] == 8
        figures = workload["figures"]
        for target in ("edged", "raw"):
            fig = figures[target]
            for key in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "aggregate_tok_s", "s_per_1k_tokens"):
                assert fig[key]["n"] == 2 and len(fig[key]["values"]) == 2, (target, key)
                assert fig[key]["mean"] > 0 and fig[key]["std"] is not None
                assert fig[key]["mean"] == pytest.approx(sum(fig[key]["values"]) / 2)
            assert fig["s_per_1k_tokens"]["values"][0] * fig["aggregate_tok_s"]["values"][0] == pytest.approx(
                1000
            )
            assert fig["rss_anon_mb"]["mean"] > 1
            assert abs(fig["prompt_tokens"]["mean"] - 128) <= 4
        # Both targets were given the very same prompts.
        assert figures["edged"]["prompt_tokens"]["values"] == figures["raw"]["prompt_tokens"]["values"]
        ratios = workload["ratios"]["edged/raw"]
        assert set(ratios) >= {"ttft_ms", "prefill_tok_s", "decode_tok_s", "aggregate_tok_s", "rss_anon_mb"}
        for key, ratio in ratios.items():
            assert ratio == pytest.approx(figures["edged"][key]["mean"] / figures["raw"][key]["mean"]), key
    # Without --restart: the first start of each target, seconds to ready.
    startup = report["startup"]
    assert set(startup["figures"]) == {"edged", "raw"}
    for target in ("edged", "raw"):
        fig = startup["figures"][target]
        assert fig["n"] == 1 and fig["median"] == fig["values"][0] > 0, target
    edged_s, raw_s = startup["figures"]["edged"]["median"], startup["figures"]["raw"]["median"]
    assert edged_s < 300  # the bench's own bound on a start
    assert startup["ratios"]["edged/raw"] == pytest.approx(edged_s / raw_s)
    assert startup["differences_s"]["edged/raw"] == pytest.approx(edged_s - raw_s)
    assert "ready_s" in report["definitions"]


def test_bench_table_with_prefix_repeat_and_restart(tmp_path: Path) -> None:
    done = bench(
        "--runs", "1", "--workload", "prefix-repeat", "--restart", "--max-tokens", "4", *daemon_env(tmp_path)
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = done.stdout
    for text in ("prefix-repeat", "TTFT cold ms", "TTFT warm/cold", "TTFT after restart ms", "edged/raw"):
        assert text in table, table
    assert "restarted 1 times" in table
    assert "startup" in table and "ready s, median (min-max)" in table, table


def test_bench_restart_measures_a_start_per_run(tmp_path: Path) -> None:
    """With --restart every target starts once per run: the start-up figure is over --runs starts,
    and restarting edged for start-up is not counted as prefix-repeat's restart."""
    done = bench(
        "--runs", "3", "--restart", "--workload", "seeds", "--max-tokens", "4", "--json",
        *daemon_env(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    startup = report["startup"]
    for target in ("edged", "raw"):
        fig = startup["figures"][target]
        assert fig["n"] == 3 and len(fig["values"]) == 3 and min(fig["values"]) > 0, target
        assert fig["median"] == sorted(fig["values"])[1], target
    assert startup["ratios"]["edged/raw"] == pytest.approx(
        startup["figures"]["edged"]["median"] / startup["figures"]["raw"]["median"]
    )
    edged = next(t for t in report["targets"] if t["name"] == "edged")
    assert not any("restarted" in note for note in edged["notes"]), edged["notes"]
    # The runs after the restarts still answer (the raw target's model and tokenizer were made anew).
    seeds = report["workloads"][0]["figures"]
    assert seeds["raw"]["ttft_ms"]["n"] == 3 and seeds["edged"]["ttft_ms"]["n"] == 3


def test_bench_reports_a_daemon_that_cannot_start(tmp_path: Path) -> None:
    done = bench(
        "--runs", "1", "--workload", "seeds", "--max-tokens", "4",
        "--edged-env", "EDGED_MODEL__CTX=not-a-number", *daemon_env(tmp_path),
    )  # fmt: skip
    assert done.returncode == 1
    assert "edged exited with 78" in done.stderr
    assert "model.ctx" in done.stderr


@pytest.mark.timeout(600)  # two daemons' worth of model loads and a 256-token call on a busy machine
def test_bench_tools_times_forced_calls_on_the_r1_shaped_model(tmp_path: Path, tiny_model: Path) -> None:
    """The tools workload on the R1-shaped model (random weights: a call may break an integer bound,
    which no grammar holds): every run is counted, valid or invalid with its reason; raw is not run,
    and without --llama-server the workload says so (llama-server's side: tests/unit/bench)."""
    done = bench(
        "--model", str(tiny_model), "--runs", "1", "--workload", "tools", "--json", *daemon_env(tmp_path),
        timeout=560,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [t["name"] for t in report["targets"]] == ["edged", "raw"]
    [tools] = report["workloads"]
    assert (tools["name"], tools["jobs_per_run"], tools["generated_tokens_per_job"]) == ("tools", 1, 256)
    assert set(tools["figures"]["raw"]) == {"rss_anon_mb"}  # raw ran nothing ...
    assert tools["notes"][0].startswith("raw: not run.")  # ... and the table says why
    assert tools["notes"][1] == "no llama-server to compare with (--llama-server PATH)"
    edged = tools["figures"]["edged"]
    valid = edged["call_valid"]["values"]
    assert len(valid) == 1 and set(valid) <= {0.0, 1.0}
    invalid_notes = [n for n in tools["notes"] if n.startswith("edged, run ") and ": invalid call: " in n]
    assert len(invalid_notes) == valid.count(0.0), tools["notes"]
    assert all(n.split(": invalid call: ", 1)[1] for n in invalid_notes)
    # Seconds to the call: the valid calls only.
    seconds = edged.get("call_s", {"values": []})["values"]
    assert len(seconds) == valid.count(1.0) and all(s > 0 for s in seconds)
    if "prompt_tokens" in edged:  # the answered runs: R1's system prompt describes the 4 tools
        assert min(edged["prompt_tokens"]["values"]) > 300
        assert max(edged["completion_tokens"]["values"]) <= 256
        assert edged["call_decode_tok_s"]["median"] > 0 and edged["prefill_tok_s"]["median"] > 0
    assert tools["paired_ratios"] == {}
    for key in ("call_s", "call_valid", "completion_tokens", "call_tok_s"):
        assert key in report["definitions"], key


@pytest.mark.timeout(600)
def test_bench_tools_table_on_the_embedded_model(tmp_path: Path) -> None:
    """SmolLM2 (the generic family: the whole answer is a call under a grammar) makes a valid call; the
    table shows it as a count, the seconds as a median, raw as not run."""
    done = bench("--runs", "1", "--workload", "tools", *daemon_env(tmp_path), timeout=560)
    assert done.returncode == 0, done.stderr
    cells = {}
    for line in done.stdout.splitlines():
        row = [c.strip() for c in line.strip("│┃").split("│")]
        if len(row) > 3:
            cells[row[1]] = row[2:]
    # edged, raw, edged/raw
    assert cells["valid calls"] == ["1/1", "-", "-"], done.stdout
    edged_s, raw_s, _ = cells["s to the call, median (min-max)"]
    assert float(edged_s) > 0 and raw_s == "-"
    assert "tools: raw: not run." in done.stdout
    assert "invalid call" not in done.stdout
