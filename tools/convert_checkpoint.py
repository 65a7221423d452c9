"""Convert checkpoints, streaming one tensor at a time:

    python tools/convert_checkpoint.py hf-to-megolmo HF_DIR CKPT_DIR
    python tools/convert_checkpoint.py megolmo-to-hf CKPT_DIR HF_DIR [--dtype bf16|fp32] [--tokenizer FILE|DIR]
        [--chat-template olmo2]

--tokenizer FILE (a tokenizer.json-style file such as OLMo 2's allenai_dolma2.json) writes tokenizer.json,
tokenizer_config.json and special_tokens_map.json as OLMo 2's release has them; --chat-template olmo2 adds
OLMo 2 Instruct's chat template. See megolmo/checkpoint/hf_tokenizer.py.
"""

import os
import sys

try:
    import megolmo  # noqa: F401
except ImportError:  # run from a checkout without installing: the repo root is this file's parent's parent
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megolmo.checkpoint.hf import convert_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(convert_main())
