"""alma-r: build machine-translation LLMs with Contrastive Preference Optimization (ALMA-R)."""

__version__ = "0.1.0"
