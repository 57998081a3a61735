"""The torch side of alma-r: prompts, model loading, generation, scoring, the CPO loss and trainer."""
