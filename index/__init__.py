"""Vector store: FAISS indexes (GPU/CPU), the case catalog, persistence.

Knows nothing about images or models: numpy vectors in, `(D, I)` out.
"""

from .atomic import atomic_dir, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_dir", "atomic_write_bytes", "atomic_write_text"]
