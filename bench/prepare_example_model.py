"""Build a random-initialised preset model folder (on the GPU) and give it a real tokenizer + chat template.

    python bench/prepare_example_model.py qwen2-1.5b /tmp/bench-cache TOKENIZER_DIR

There is no model hub on the benchmark machine: the architecture is real (the preset's config), the weights
random; the tokenizer (any real one, e.g. SmolLM2's) only has to produce ids below the vocabulary size.
"""
import shutil
import sys
from pathlib import Path

from turbotune.bench.presets import build_preset_model

folder = build_preset_model(sys.argv[1], 0, Path(sys.argv[2]), "cuda")
for f in Path(sys.argv[3]).iterdir():
    shutil.copy(f, folder / f.name)
print(folder)
