"""Decoding: options (what one call shares), the strategy registry, the engine loop and scoring.

Layers inside the package, each importing only the ones above it: rules (pure commit rules) ->
state (a batch's tensors) -> step (model calls, commit bookkeeping) -> speculative, soft ->
strategies (the registry) -> options (defaults, precedence, checks) -> engine (the loop); scoring
(likelihoods for lm-eval and studies) stands beside the engine.
"""

from edlm.decode.engine import generate, stream
from edlm.decode.options import DecodeOptions
from edlm.decode.state import BlockEvent, GenerationResult, RowStats

__all__ = ["BlockEvent", "DecodeOptions", "GenerationResult", "RowStats", "generate", "stream"]
