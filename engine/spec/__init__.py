"""Speculative decoding: proposers draft tokens, the target verifies them
in one forward (``decoder.SpecDecoder``), rejection sampling keeps the
target's distribution (``rejection``), the speculation length adapts to the
batch (``adaptive``). Proposers by name: ``proposer.PROPOSERS`` (``ngram``,
``draft``)."""
