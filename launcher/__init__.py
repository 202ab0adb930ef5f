"""ftlaunch: fine-tune large causal LMs with DeepSpeed, checked before anything is queued."""

__version__ = "0.1.0"
