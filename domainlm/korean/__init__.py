"""Korean text: Hangul normalization, jamo decomposition and shingling."""
