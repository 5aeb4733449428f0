"""The six slots a fresh hal0 starts with: one default per capability, each with a model
from lemond v10.6.0's built-in catalogue sized for a small AMD box. Used by the data
migration and by `install` (which re-seeds missing ones without touching edited ones)."""

DEFAULT_SLOTS = [
    {"name": "chat", "capability": "chat", "device": "gpu-rocm",
     "model_name": "Qwen3-4B-Instruct-2507-GGUF", "ctx_size": 16384},
    {"name": "embed", "capability": "embed", "device": "gpu-vulkan",
     "model_name": "nomic-embed-text-v1-GGUF", "ctx_size": None},
    {"name": "rerank", "capability": "rerank", "device": "gpu-vulkan",
     "model_name": "bge-reranker-v2-m3-GGUF", "ctx_size": None},
    {"name": "stt", "capability": "stt", "device": "cpu",
     "model_name": "Whisper-Large-v3-Turbo", "ctx_size": None},
    {"name": "tts", "capability": "tts", "device": "cpu",
     "model_name": "kokoro-v1", "ctx_size": None},
    {"name": "img", "capability": "img", "device": "gpu-rocm",
     "model_name": "SD-Turbo", "ctx_size": None},
]
