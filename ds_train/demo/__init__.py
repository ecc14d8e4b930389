"""The embedded default: a corpus and tasks built from text every machine has (Python's stdlib)."""
