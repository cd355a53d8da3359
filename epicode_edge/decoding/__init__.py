"""Contrastive decoding: pure numpy functions and the streaming loop. Imports no engine."""
