"""Text layer: tokenizer, chat templates, streaming detokenization, reasoning and stop handling."""
