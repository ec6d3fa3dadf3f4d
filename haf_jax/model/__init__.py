"""Gemma-family trunk (gemma.py), its config (config.py), the two heads (heads.py), HF import/export (hf.py)."""
