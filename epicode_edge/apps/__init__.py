"""Applications built on decoding/ and the Runtime: chat, batch, eval, tune, demo."""
