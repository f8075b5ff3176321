/*
 * The RKLLM runtime's C structs as each release's rkllm.h declares them, compiled by gcc, printing
 * sizeof and offsetof as JSON so tests/test_rkllm_abi.py can compare them with edged's ctypes
 * layouts. Build with -DRKLLM_ABI=110 (1.1.x), 120 (1.2.0), 121 (1.2.1-1.2.3) or 130 (1.3.0).
 */
#include <stdio.h>
#include "rkllm_abi.h"

static int first = 1;
static void field(const char *name, size_t value) {
    printf("%s\n  \"%s\": %zu", first ? "" : ",", name, value);
    first = 0;
}
#define SIZE(T) field(#T, sizeof(T))
#define OFF(T, f) field(#T "." #f, offsetof(T, f))

int main(void) {
    printf("{");
    SIZE(RKLLMExtendParam); OFF(RKLLMExtendParam, reserved);
#if RKLLM_ABI >= 120
    OFF(RKLLMExtendParam, enabled_cpus_mask);
#endif
    SIZE(RKLLMParam);
    OFF(RKLLMParam, max_context_len); OFF(RKLLMParam, top_p); OFF(RKLLMParam, mirostat_eta);
    OFF(RKLLMParam, skip_special_token); OFF(RKLLMParam, is_async); OFF(RKLLMParam, extend_param);
#if RKLLM_ABI >= 120
    OFF(RKLLMParam, n_keep);
#endif
    SIZE(RKLLMInput); OFF(RKLLMInput, input_type); OFF(RKLLMInput, prompt_input);
    SIZE(RKLLMInferParam); OFF(RKLLMInferParam, prompt_cache_params);
#if RKLLM_ABI >= 120
    OFF(RKLLMInferParam, keep_history);
#endif
#if RKLLM_ABI >= 130
    OFF(RKLLMInferParam, max_new_tokens);
#endif
    SIZE(RKLLMResult); OFF(RKLLMResult, last_hidden_layer);
#if RKLLM_ABI >= 121
    OFF(RKLLMResult, perf);
#endif
    printf("\n}\n");
    return 0;
}
