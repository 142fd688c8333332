"""Image files: finding them and decoding them safely into model-ready pixels."""
