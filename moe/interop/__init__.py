"""Interoperability with the HuggingFace ecosystem: tokenizers (`tokenizer`)."""
