"""Deprecated: moved to :mod:`retlm.demo.corpus` (this alias goes in the next release)."""

import sys
import warnings

from retlm.demo import corpus

warnings.warn("retlm.corpus is deprecated; use retlm.demo.corpus", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = corpus
