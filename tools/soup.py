"""Average checkpoints (megolmo or Hugging Face, mixed) into a model soup, streaming one tensor at a time:

    python tools/soup.py --output OUT [--format megolmo|hf] [--weights W1 W2 ...] IN1 IN2 ...
        [--tokenizer FILE|DIR] [--chat-template olmo2]     # these two with --format hf
"""

import os
import sys

try:
    import megolmo  # noqa: F401
except ImportError:  # run from a checkout without installing: the repo root is this file's parent's parent
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megolmo.checkpoint.soup import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
