"""SmolLM2-135M's config and tokenizer with seeded random weights (bf16): the embedded model's shapes
and token counts for throughput on a machine the 98 MB GGUF cannot reach."""
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, dst = Path(__file__).parent / "smol", Path(sys.argv[1])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).to(torch.bfloat16)
model.save_pretrained(dst)
for f in src.glob("tokenizer*"):
    shutil.copy(f, dst / f.name)
print("random model at", dst, sum(p.numel() for p in model.parameters()) / 1e6, "M params")
