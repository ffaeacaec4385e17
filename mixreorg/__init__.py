"""mixreorg: MixReorg pretraining and fused patch-mixing primitives for vision transformers."""

__version__ = "0.1.0"
