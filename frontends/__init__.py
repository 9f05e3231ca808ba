"""Frontends: from a user's ``nn.Module`` to archir's IR."""
from .trace import trace

__all__ = ["trace"]
