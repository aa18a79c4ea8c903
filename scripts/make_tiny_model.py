#!/usr/bin/env python
"""Write the tiny offline test model (Llama architecture, ~35k parameters, ChatML tokenizer) to OUT_DIR.

Usage: python scripts/make_tiny_model.py OUT_DIR
"""

import sys

from slmtune.synthetic.tiny import build_tiny_model

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    print(build_tiny_model(sys.argv[1]))
