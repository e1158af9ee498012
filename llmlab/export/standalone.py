"""The `run` export: the weights plus a one-file numpy runner, for reading or running a model without torch.

The folder holds model.safetensors and config.json in llmlab's own format (the checkpoint's files), the
tokenizer.json, and run.py, a verbatim copy of `llmlab/export/run_numpy.py`: the whole forward pass on one
page, which needs only numpy and safetensors (plus `tokenizers` for text) and gives llmlab's greedy tokens; with
--chat it runs the assistant's calculator calls as the engine does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save as tensors_to_bytes

from llmlab.export.folder import atomic_dir
from llmlab.fileio import write_durably
from llmlab.model import GPT
from llmlab.tokenizer import Tokenizer

RUN_SCRIPT = Path(__file__).with_name("run_numpy.py")


def export_run(model: GPT, tokenizer: Tokenizer | None, out_dir: str | Path, *, force: bool = False,
               source: str | Path | None = None) -> Path:
    """Write model.safetensors, config.json, tokenizer.json (when given) and run.py. Returns run.py's path."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")  # stored once, as in checkpoints; run.py reuses the embedding
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    info = {"format": "run", "source": str(source) if source else None}
    with atomic_dir(out_dir, force=force, info=info, source=source) as tmp:
        # as bytes through open(): safetensors' save_file creates its file 0600, the other files follow the umask
        write_durably(tmp / "model.safetensors", tensors_to_bytes(tensors))
        config = {"model_type": "llmlab", **model.config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        shutil.copyfile(RUN_SCRIPT, tmp / "run.py")
    return Path(out_dir) / "run.py"
