"""Deprecated: renamed :mod:`retlm.checksums` (this alias goes in the next release)."""

import sys
import warnings

from retlm import checksums

warnings.warn("retlm.integrity is deprecated; use retlm.checksums", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = checksums
