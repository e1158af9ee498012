"""Exports of a llmlab model to other runtimes.

    format     writes (into one folder)                                       loads in
    hf         model.safetensors, config.json, generation_config.json,         transformers (Qwen3 / Llama)
               tokenizer.json, tokenizer_config.json (chat template)
    gguf       model.gguf (fp32, tokenizer and chat template inside)          llama.cpp and its bindings
    run        model.safetensors, config.json, tokenizer.json, run.py         python + numpy, no torch
    tokenizer  tokenizer.json, tokenizer_config.json                          transformers' AutoTokenizer, llmlab

Each folder is written atomically (`llmlab.export.folder`) and carries `llmlab_export.json` (format, source).
The `llmlab export` stage (llmlab.stages.export) runs these on a checkpoint. Reading Hugging Face folders (import)
is `llmlab.hf`, which `llmlab.checkpoint` and the `hf` exporter share.
"""

from llmlab.export.hf import export_hf, export_tokenizer, hf_model
from llmlab.export.llamacpp import export_gguf
from llmlab.export.standalone import export_run

FORMATS = ("hf", "gguf", "run", "tokenizer")

__all__ = ["FORMATS", "export_gguf", "export_hf", "export_run", "export_tokenizer", "hf_model"]
