"""Engines beyond Hugging Face's ``generate``: one folder or file per engine, each a thin edge
over the same adapters and selection pipeline."""
