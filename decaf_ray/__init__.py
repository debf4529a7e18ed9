"""decaf-ray: simulate decentralized LoRA fine-tuning (DeCAF, arXiv 2505.21382) on Ray."""

__version__ = "0.1.0"
