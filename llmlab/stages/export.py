"""`llmlab export`: a checkpoint as a Hugging Face folder, a GGUF file, a standalone numpy runner, or a tokenizer.

    llmlab export --checkpoint runs/cpu/sft --format hf      # -> runs/cpu/export-hf (transformers)
    llmlab export --format gguf                              # -> runs/cpu/export-gguf/model.gguf (llama.cpp)
    llmlab export --format run                               # -> runs/cpu/export-run/run.py (numpy only)
    llmlab export --format tokenizer --checkpoint runs/cpu/tokenizer

The checkpoint may itself be a Hugging Face Llama or Qwen3 folder (e.g. to turn it into GGUF). See
llmlab.export for what each format holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmlab import checkpoint
from llmlab.errors import LLMLabError
from llmlab.export import FORMATS, export_gguf, export_hf, export_run, export_tokenizer
from llmlab.export.folder import check_replaceable
from llmlab.tokenizer import Tokenizer

HOW_TO_USE = {
    "hf": "transformers.AutoModelForCausalLM.from_pretrained('{out}') and AutoTokenizer.from_pretrained('{out}')",
    "gguf": "llama-cli -m {out}/model.gguf  (or llama_cpp.Llama(model_path=...))",
    "run": "python {out}/run.py --chat 'Hello!'",
    "tokenizer": "transformers.AutoTokenizer.from_pretrained('{out}') or llmlab.tokenizer.Tokenizer.load('{out}')",
}


@dataclass
class Config:
    checkpoint: str = "runs/cpu/sft"
    """checkpoint to export: a checkpoint directory, a training out_dir (its latest checkpoint), or a Hugging
    Face Llama/Qwen3 folder; with --format tokenizer also a tokenizer directory"""
    format: str = "hf"
    """hf (a transformers folder), gguf (llama.cpp), run (model + standalone numpy run.py), or tokenizer"""
    out_dir: str = ""
    """folder to write; empty means export-<format> next to the checkpoint (runs/cpu/export-hf)"""
    force: bool = False
    """replace out_dir even when it holds files that are not an earlier llmlab export"""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise LLMLabError(f"export: unknown format {self.format!r}: use one of {', '.join(FORMATS)}")


def _tokenizer_source(path: str) -> Path:
    """What holds the tokenizer: a tokenizer.json, a folder with one, or a training out_dir's latest checkpoint."""
    p = Path(path)
    return p if p.is_file() or (p / "tokenizer.json").is_file() else checkpoint.resolve(p)


def main(cfg: Config) -> dict:
    out_dir = Path(cfg.out_dir or Path(cfg.checkpoint).parent / f"export-{cfg.format}")

    # ---- tokenizer only -------------------------------------------------------------------------------
    if cfg.format == "tokenizer":
        source = _tokenizer_source(cfg.checkpoint)
        check_replaceable(out_dir, cfg.force, source)
        tokenizer = Tokenizer.load(source)
        max_len = checkpoint.load_model_config(source).context_len if (source / "model.safetensors").is_file() else None
        written = export_tokenizer(tokenizer, out_dir, force=cfg.force, source=source, model_max_length=max_len)

    # ---- a model: load, then write the format -------------------------------------------------------
    else:
        source = checkpoint.resolve(cfg.checkpoint)
        check_replaceable(out_dir, cfg.force, source)  # before loading a model for nothing
        model = checkpoint.load_model(source)
        if model.config.num_labels:
            raise LLMLabError(f"{source} is a reward model (a scorer, num_labels={model.config.num_labels}): the "
                              f"exports are of language models; export the assistant it scores instead")
        tokenizer = Tokenizer.load(source) if (source / "tokenizer.json").is_file() else None
        if cfg.format == "gguf" and tokenizer is None:
            raise LLMLabError(f"{source} has no tokenizer.json: a GGUF file carries its tokenizer, so export a "
                              f"checkpoint saved with one")
        exporter = {"hf": export_hf, "gguf": export_gguf, "run": export_run}[cfg.format]
        written = exporter(model, tokenizer, out_dir, force=cfg.force, source=source)

    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    print(f"exported {source} as {cfg.format} -> {written} ({len(files)} files, {size / 1e6:.1f} MB)")
    print("use: " + HOW_TO_USE[cfg.format].format(out=out_dir))
    return {"format": cfg.format, "out_dir": str(out_dir), "path": str(written), "files": [p.name for p in files],
            "bytes": size}
