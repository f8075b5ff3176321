"""Tool calls: the model is told about the client's tools in its own format and its calls are parsed
back, on every transport.

Three formats (`edged.tools.family`, recognised from the GGUF's chat template and vocabulary):

- ``hermes`` (Hermes 2/3 Pro, Qwen 2.5/3): the chat template renders the ``tools`` itself; the model
  writes ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`` and reads results back as
  ``<tool_response>`` blocks (the template's own rendering of ``role: tool``).
- ``deepseek_r1`` (the R1 distills): the template does not render tools, so edged describes them in
  the system prompt and the model writes R1's markup, ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>
  function<｜tool▁sep｜>f\\n```json\\n{...}\\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>``; results go
  back through the template's ``<｜tool▁outputs▁begin｜>`` rendering.
- ``generic`` (any other template, the embedded SmolLM2): the tools are described in the system prompt
  and the whole answer is one JSON object, ``{"tool_calls": [{"name": "f", "arguments": {...}}]}`` or
  ``{"response": "text"}``; earlier calls and results are rendered back as such JSON.

`spec` normalizes requests (OpenAI ``tools``/``functions``/``tool_choice``/``function_call``, Ollama
``tools``), `render` turns a conversation into messages for the model's template, `grammar` builds
the GBNF that makes calls well formed (lazy for ``auto`` where the format has a trigger), `parse`
extracts calls from finished or streamed text (never leaving markup in the content), and `history`
fits a long conversation into the context. Nothing here needs a model or a transport.

Call ids are ``call_`` and 24 letters and digits, as OpenAI's. A job's calls take theirs from the job
id and the call's index (`spec.call_ids_for`): the stream and the final message, and a journaled job
run again after a restart, name each call the same. `spec.random_call_id` is for text parsed outside
a job (the parsers' default).
"""

# ruff: noqa: RUF002 - R1's markers are spelled with fullwidth bars and a lower block, as in its tokenizer.
