"""Shared fixtures for the transformers tests: small-config Hugging Face models and the real all-MiniLM-L6-v2."""
