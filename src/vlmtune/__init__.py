"""vlmtune: fine-tune vision-language models component by component."""

__version__ = "0.1.0"
