/*
 * A stand-in for Rockchip's librkllmrt.so: the same C functions and struct layouts (rkllm_abi.h,
 * one build per runtime ABI), no NPU. It generates "tok0 tok1 ..." through the result callback,
 * reports perf numbers where the ABI has them, honours rkllm_abort, and checks that the caller's
 * structs have the layout of this ABI (a sentinel written by rkllm_createDefaultParam must come
 * back at the same offset in rkllm_init). Like the real runtime after rkllm_set_chat_template (which
 * edged calls), it wraps the prompt in no template: what the caller passes is what "the model" reads.
 * Releases 1.2.1+ export rkllm_set_function_tools, as the real ones: it is recorded and, as in the
 * real runtime once rkllm_set_chat_template has switched its own template off, puts nothing into the
 * prompt (airockchip/rknn-llm issues 429, 431).
 *
 * Steered by environment variables, read at rkllm_init:
 *   STUB_FAIL_INIT=1        rkllm_init fails
 *   STUB_FAIL_AFTER=N       the run reports RKLLM_RUN_ERROR after N tokens
 *   STUB_HANG_AFTER=N       the run blocks forever after N tokens (ignores abort)
 *   STUB_TOKEN_MS=N         time per generated token (default 5 ms)
 *   STUB_BAD_UTF8_AT=N      token N is the lone byte 0xFF (invalid UTF-8), then text goes on
 *   STUB_RECORD=FILE        each run appends one JSON line: what the caller set (role, max_new_tokens,
 *                           the per-run sampling of 1.3.0, the init-time sampling and CPUs, the prompt);
 *                           each rkllm_set_function_tools call appends {"call": "set_function_tools", ...}
 *   STUB_REPLY=TEXT         the run writes TEXT (a model's answer, in pieces of up to 3 characters, one
 *                           per "token") and then ends as at an end-of-sequence token, instead of
 *                           "tok0 tok1 ..." up to max_new_tokens
 */
#define _GNU_SOURCE
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "rkllm_abi.h"

#define SENTINEL 0xA5

/*
 * Version strings laid out as the real releases carry them (from the strings of the official 1.2.1b1
 * aarch64 build, and the log lines of the others): no literal "rkllm-runtime version: X" anywhere;
 * 1.2.0 and later have the SDK banner; every release keeps the bare version literal right before its
 * log format string, beside the minimum driver version "0.9.7"; the embedded RKNN library's own version
 * (2.3.3b0, not RKLLM's) is there too, as a decoy. -DSTUB_SILENT builds a library that says nothing.
 */
#ifndef STUB_SILENT
#if RKLLM_ABI >= 120
__attribute__((used)) static const char sdk_banner[] =
    "RKLLM SDK (version: " STUB_VERSION " | target: Linux | build: 27637c95 2025-05-02 17:46:07)";
#endif
__attribute__((used)) static const char runtime_strings[] =
    "0.9.7\0W rkllm: Warning: Your rknpu driver version is too low, please upgrade to %s\0" STUB_VERSION
    "\0I rkllm: rkllm-runtime version: %s, rknpu driver version: %s, platform: %s\n";
__attribute__((used)) static const char rknn_strings[] =
    "rknn llm lib version: 2.3.3b0 (c54da5763@2025-04-18T15:37:10)";
#endif

typedef struct {
    RKLLMParam param;
    LLMResultCallback callback;
    void *callback_userdata;
    atomic_int abort_requested;
    atomic_int running;
    int fail_after, hang_after, token_ms, bad_utf8_at;
    const char *reply;
} Stub;

/* A JSON string literal of ``text`` (control characters and quotes escaped, UTF-8 kept as is). */
static void json_string(FILE *f, const char *text) {
    fputc('"', f);
    for (const unsigned char *c = (const unsigned char *)(text ? text : ""); *c; c++) {
        if (*c == '"' || *c == '\\') fprintf(f, "\\%c", *c);
        else if (*c < 0x20) fprintf(f, "\\u%04x", *c);
        else fputc(*c, f);
    }
    fputc('"', f);
}

static void record(const Stub *stub, const RKLLMInput *input, const RKLLMInferParam *infer, int max_new) {
    const char *path = getenv("STUB_RECORD");
    if (!path || !*path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    const RKLLMParam *p = &stub->param;
    fprintf(f, "{\"abi\": %d, \"max_new_tokens\": %d", RKLLM_ABI, max_new);
#if RKLLM_ABI >= 121
    fprintf(f, ", \"role\": \"%s\"", input->role ? input->role : "(null)");
#endif
#if RKLLM_ABI >= 130
    const RKLLMSamplingParam *sp = infer->sampling_params;
    if (sp)
        fprintf(f, ", \"sampling\": {\"top_k\": %d, \"top_p\": %.3f, \"temperature\": %.3f, \"repeat_penalty\": %.3f, "
                   "\"frequency_penalty\": %.3f, \"presence_penalty\": %.3f, \"mirostat\": %d}",
                sp->top_k, sp->top_p, sp->temperature, sp->repeat_penalty, sp->frequency_penalty,
                sp->presence_penalty, sp->mirostat);
    else
        fprintf(f, ", \"sampling\": null");
#else
    (void)infer;
#endif
    fprintf(f, ", \"init\": {\"top_k\": %d, \"top_p\": %.3f, \"temperature\": %.3f, \"repeat_penalty\": %.3f",
            p->top_k, p->top_p, p->temperature, p->repeat_penalty);
#if RKLLM_ABI >= 120
    fprintf(f, ", \"enabled_cpus_num\": %d, \"enabled_cpus_mask\": %u", p->extend_param.enabled_cpus_num,
            p->extend_param.enabled_cpus_mask);
#endif
    fprintf(f, "}, \"prompt\": ");
    json_string(f, input->prompt_input);
    fprintf(f, "}\n");
    fclose(f);
}

static int env_int(const char *name, int fallback) {
    const char *value = getenv(name);
    return value && *value ? atoi(value) : fallback;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.max_context_len = 512;
    p.max_new_tokens = -1;
    p.top_k = 1;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.skip_special_token = true;
    p.extend_param.reserved[sizeof p.extend_param.reserved - 1] = SENTINEL;
    return p;
}

/*
 * Fields the caller must set, read at this ABI's offsets: with another layout they hold what lies
 * there instead (the sentinel of the default param, zeros, another field), which these checks catch.
 */
static int check_param(const RKLLMParam *p) {
    int bad = p->extend_param.reserved[sizeof p->extend_param.reserved - 1] != SENTINEL
              || !(p->top_p > 0.0f && p->top_p <= 1.0f);
#if RKLLM_ABI >= 120
    bad = bad || p->extend_param.enabled_cpus_num <= 0
          || __builtin_popcount(p->extend_param.enabled_cpus_mask) != p->extend_param.enabled_cpus_num;
#endif
    if (bad) {
        fprintf(stderr, "rkllm stub: RKLLMParam layout mismatch (sizeof %zu, ABI %d)\n", sizeof *p, RKLLM_ABI);
        return -2;
    }
    if (!p->model_path || access(p->model_path, R_OK) != 0) {
        fprintf(stderr, "rkllm stub: cannot read model %s\n", p->model_path ? p->model_path : "(null)");
        return -3;
    }
    if (p->max_context_len <= 0 || p->max_context_len > 4096) {
        fprintf(stderr, "rkllm stub: bad max_context_len %d\n", p->max_context_len);
        return -4;
    }
    return 0;
}

#if RKLLM_ABI >= 130
int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback) {
    LLMResultCallback result_callback = callback ? callback->result_callback : NULL;
    void *userdata = callback ? callback->result_userdata : NULL;
#else
int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback) {
    LLMResultCallback result_callback = callback;
    void *userdata = NULL;
#endif
    if (env_int("STUB_FAIL_INIT", 0)) {
        fprintf(stderr, "rkllm stub: init failure requested\n");
        return -1;
    }
    int rc = check_param(param);
    if (rc != 0) return rc;
    if (!result_callback) return -5;
    Stub *stub = calloc(1, sizeof *stub);
    stub->param = *param;
    stub->param.model_path = strdup(param->model_path);
    stub->callback = result_callback;
    stub->callback_userdata = userdata;
    stub->fail_after = env_int("STUB_FAIL_AFTER", -1);
    stub->hang_after = env_int("STUB_HANG_AFTER", -1);
    stub->token_ms = env_int("STUB_TOKEN_MS", 5);
    stub->bad_utf8_at = env_int("STUB_BAD_UTF8_AT", -1);
    stub->reply = getenv("STUB_REPLY");
    *handle = stub;
    return 0;
}

static void emit(Stub *stub, RKLLMResult *result, void *userdata, LLMCallState state) {
    (void)stub->callback(result, userdata ? userdata : stub->callback_userdata, state);
}

int rkllm_run(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    Stub *stub = handle;
    if (!stub || !input || !infer || input->input_type != RKLLM_INPUT_PROMPT || !input->prompt_input) return -1;
    int max_new = stub->param.max_new_tokens;
#if RKLLM_ABI >= 130
    if (infer->max_new_tokens > 0) max_new = infer->max_new_tokens;
#endif
    if (max_new <= 0) max_new = 64;
    record(stub, input, infer, max_new);
    atomic_store(&stub->abort_requested, 0);
    atomic_store(&stub->running, 1);
    double start = now_ms();
    int prompt_tokens = (int)(strlen(input->prompt_input) / 4) + 1;
    usleep(1000 * (prompt_tokens / 8 + 1)); /* "prefill" */
    double prefill_ms = now_ms() - start;
    RKLLMResult result;
    char text[32];
    const char *reply = stub->reply;
    int produced = 0;
    for (; produced < max_new; produced++) {
        if (reply && !*reply) break; /* the scripted answer is complete: end of sequence */
        if (atomic_load(&stub->abort_requested)) break;
        if (produced == stub->hang_after) {
            for (;;) pause();
        }
        if (produced == stub->fail_after) {
            memset(&result, 0, sizeof result);
            emit(stub, &result, userdata, RKLLM_RUN_ERROR);
            atomic_store(&stub->running, 0);
            return -1;
        }
        usleep(1000 * stub->token_ms);
        memset(&result, 0, sizeof result);
        if (produced == stub->bad_utf8_at)
            snprintf(text, sizeof text, "\xff");
        else if (reply) {
            size_t n = 0; /* up to 3 whole UTF-8 characters */
            for (int chars = 0; chars < 3 && reply[n]; chars++)
                do n++; while (((unsigned char)reply[n] & 0xC0) == 0x80);
            memcpy(text, reply, n);
            text[n] = '\0';
            reply += n;
        } else
            snprintf(text, sizeof text, "tok%d ", produced);
        result.text = text;
        result.token_id = produced;
        emit(stub, &result, userdata, RKLLM_RUN_NORMAL);
    }
    memset(&result, 0, sizeof result);
#if RKLLM_ABI >= 121
    result.perf.prefill_time_ms = (float)prefill_ms;
    result.perf.prefill_tokens = prompt_tokens;
    result.perf.generate_time_ms = (float)(now_ms() - start - prefill_ms);
    result.perf.generate_tokens = produced;
    result.perf.memory_usage_mb = 1234.5f;
#else
    (void)prefill_ms;
#endif
    emit(stub, &result, userdata, RKLLM_RUN_FINISH);
    atomic_store(&stub->running, 0);
    return 0;
}

int rkllm_run_async(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    return rkllm_run(handle, input, infer, userdata);
}

int rkllm_abort(LLMHandle handle) {
    Stub *stub = handle;
    if (!stub) return -1;
    atomic_store(&stub->abort_requested, 1);
    return 0;
}

int rkllm_is_running(LLMHandle handle) {
    Stub *stub = handle;
    return stub && atomic_load(&stub->running) ? 0 : 1;
}

int rkllm_destroy(LLMHandle handle) {
    Stub *stub = handle;
    if (!stub) return -1;
    free((void *)stub->param.model_path);
    free(stub);
    return 0;
}

#if RKLLM_ABI >= 120
#if RKLLM_ABI >= 121
int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    (void)start_pos;
    (void)end_pos;
#else
int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt) {
#endif
    (void)keep_system_prompt;
    return handle ? 0 : -1;
}

int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prefix, const char *postfix) {
    (void)system_prompt;
    (void)prefix;
    (void)postfix;
    return handle ? 0 : -1;
}
#endif

#if RKLLM_ABI >= 121
int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                             const char *tool_response_str) {
    if (!handle || !tools) return -1;
    const char *path = getenv("STUB_RECORD");
    FILE *f = path && *path ? fopen(path, "a") : NULL;
    if (f) {
        fprintf(f, "{\"call\": \"set_function_tools\", \"system_prompt\": ");
        json_string(f, system_prompt);
        fprintf(f, ", \"tools\": ");
        json_string(f, tools);
        fprintf(f, ", \"tool_response_str\": ");
        json_string(f, tool_response_str);
        fprintf(f, "}\n");
        fclose(f);
    }
    return 0;
}
#endif

int rkllm_load_prompt_cache(LLMHandle handle, const char *path) {
    (void)path;
    return handle ? 0 : -1;
}
