"""segtune: fine-tune Hugging Face Segment-Anything models on medical segmentation data."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft) warns at import, on every command, that it could not fetch an
# optional CPU kernel from the Hugging Face hub; its own 4-bit CPU path works without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# MobileSAM has no transformers class: registering it lets AutoConfig/AutoModel read its folders.
import segtune.models.mobilesam  # noqa: E402, F401
