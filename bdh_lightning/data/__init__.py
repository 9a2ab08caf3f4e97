"""Byte-level data: a corpus of files (corpus.py), its batches and the DataModule (module.py), contiguous streams
for carried state (streams.py), and prepared folders streamed with LitData (litdata.py, made by prepare.py)."""

from .module import ByteDataModule

__all__ = ["ByteDataModule"]
