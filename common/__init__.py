"""Small shared infrastructure: user-facing errors and atomic, manifested artifacts."""

import os

# transformers is used for tokenizers only; its "PyTorch was not found" advice would be the
# first line on stderr of every command (and the only noise around a one-line error).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
