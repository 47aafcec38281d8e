"""Text <-> tokens: the tokenizers (words, characters, SMILES) and the vocabulary."""
