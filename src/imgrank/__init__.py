"""imgrank: sort photos by what a sentence asks for.

The library never prints or exits; :mod:`imgrank.cli` turns library errors
(:class:`imgrank.errors.ImgrankError`) into one clear message and an exit code.
Heavy dependencies (torch, open_clip, onnxruntime) are imported inside the
functions that need them so that ``imgrank --help`` stays instant.
"""

__version__ = "0.1.0"
