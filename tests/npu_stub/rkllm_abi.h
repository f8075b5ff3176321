/*
 * The RKLLM runtime's C structs as each release's rkllm.h declares them (airockchip/rknn-llm),
 * selected with -DRKLLM_ABI=110 (1.1.x), 120 (1.2.0), 121 (1.2.1-1.2.3) or 130 (1.3.0); 1.2.1b1 is
 * -DRKLLM_ABI=120 -DRKLLM_121B1 (1.2.0's layout with 1.2.1's larger multimodal input).
 * Shared by the layout probe and the stand-in runtime library the tests build.
 */
#ifndef EDGED_RKLLM_ABI_H
#define EDGED_RKLLM_ABI_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef RKLLM_ABI
#error "define RKLLM_ABI"
#endif

typedef void *LLMHandle;
typedef enum { RKLLM_RUN_NORMAL = 0, RKLLM_RUN_WAITING = 1, RKLLM_RUN_FINISH = 2, RKLLM_RUN_ERROR = 3 } LLMCallState;
typedef enum { RKLLM_INPUT_PROMPT = 0, RKLLM_INPUT_TOKEN = 1 } RKLLMInputType;
typedef enum { RKLLM_INFER_GENERATE = 0 } RKLLMInferMode;

typedef struct { float *embed; size_t n_tokens; } RKLLMEmbedInput;
typedef struct { int32_t *input_ids; size_t n_tokens; } RKLLMTokenInput;
typedef struct { const char *lora_adapter_name; } RKLLMLoraParam;
typedef struct { int save_prompt_cache; const char *prompt_cache_path; } RKLLMPromptCacheParam;
typedef struct { const float *hidden_states; int embd_size; int num_tokens; } RKLLMResultLastHiddenLayer;
typedef struct { const float *logits; int vocab_size; int num_tokens; } RKLLMResultLogits;
typedef struct {
    float prefill_time_ms; int prefill_tokens; float generate_time_ms; int generate_tokens; float memory_usage_mb;
} RKLLMPerfStat;

#if RKLLM_ABI == 110
typedef struct { int32_t base_domain_id; uint8_t reserved[112]; } RKLLMExtendParam;
#elif RKLLM_ABI == 120
typedef struct {
    int32_t base_domain_id; int8_t embed_flash; int8_t enabled_cpus_num; uint32_t enabled_cpus_mask;
    uint8_t reserved[106];
} RKLLMExtendParam;
#else
typedef struct {
    int32_t base_domain_id; int8_t embed_flash; int8_t enabled_cpus_num; uint32_t enabled_cpus_mask;
    uint8_t n_batch; int8_t use_cross_attn; uint8_t reserved[104];
} RKLLMExtendParam;
#endif

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
#if RKLLM_ABI >= 120
    int32_t n_keep;
#endif
    float top_p, temperature, repeat_penalty, frequency_penalty, presence_penalty;
    int32_t mirostat;
    float mirostat_tau, mirostat_eta;
    bool skip_special_token;
#if RKLLM_ABI >= 130
    bool ignore_eos_token;
#endif
    bool is_async;
#if RKLLM_ABI < 130
    const char *img_start, *img_end, *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

#if RKLLM_ABI <= 120 && !defined(RKLLM_121B1)
typedef struct { char *prompt; float *image_embed; size_t n_image_tokens; } RKLLMMultiModalInput;
#elif RKLLM_ABI == 121 || defined(RKLLM_121B1)  /* 1.2.1b1: 1.2.0 plus this larger input */
typedef struct {
    char *prompt; float *image_embed; size_t n_image_tokens; size_t n_image; size_t image_width; size_t image_height;
} RKLLMMultiModalInput;
#else
typedef struct {
    char *prompt;
    struct {
        float *image_embed; size_t n_image_tokens; size_t n_image;
        const char *image_start, *image_end, *image_content; size_t image_width, image_height;
    } image;
    struct {
        float *video_embed; size_t n_frame_tokens, n_frame_per_video, n_video;
        const char *video_start, *video_end, *video_content; size_t frame_width, frame_height;
    } video;
} RKLLMMultiModalInput;
#endif

typedef struct {
#if RKLLM_ABI >= 121
    const char *role;
    bool enable_thinking;
#endif
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

#if RKLLM_ABI >= 130
typedef struct {
    int32_t top_k; float top_p, temperature, repeat_penalty, frequency_penalty, presence_penalty;
    int32_t mirostat; float mirostat_tau, mirostat_eta;
} RKLLMSamplingParam;
#endif

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#if RKLLM_ABI >= 130
    RKLLMSamplingParam *sampling_params;
#endif
#if RKLLM_ABI >= 120
    int keep_history;
#endif
#if RKLLM_ABI >= 130
    int32_t max_new_tokens;
#endif
} RKLLMInferParam;

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
#if RKLLM_ABI >= 120
    RKLLMResultLogits logits;
#endif
#if RKLLM_ABI >= 121
    RKLLMPerfStat perf;
#endif
} RKLLMResult;


#if RKLLM_ABI >= 121
typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);
#else
typedef void (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);
#endif

#if RKLLM_ABI >= 130
typedef int (*LLMGetEmbedCallback)(void *userdata, int32_t *tokens, uint64_t num_tokens, void *embed, uint64_t len);
typedef int (*LLMTokenizerCallback)(void *userdata, const char *text, int32_t text_len, int32_t *tokens, int32_t n_tokens_max);
typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    LLMTokenizerCallback tokenizer_callback;
    void *tokenizer_userdata;
    LLMGetEmbedCallback embed_callback;
    void *embed_userdata;
} RKLLMCallback;
#endif
#endif
