"""segtune: fine-tune Hugging Face Segment-Anything models on medical segmentation data."""

__version__ = "0.1.0"
