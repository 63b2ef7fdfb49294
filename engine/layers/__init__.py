"""Building blocks of Llama-family decoders: norm, rotary, attention, MLP."""
