"""What each model family *is*, whatever engine runs it.

A family module holds the knowledge both engines need and neither owns: which module is
the projector the methods score and how to rebuild it from checkpoint tensors, how an
image's visual tokens are laid out in its run of placeholders (crops, rows, separators,
frames), how a merger groups and orders the tower's states, how many crops an image
gets. It takes configs and tensors and returns :class:`~zooprune.pipeline.EncodedImages`
and :class:`~zooprune.pipeline.ImageLayout`; where a layout depends on how an engine packs
tokens, it takes that packing as a callable.

It imports torch, transformers' pure helper functions and :mod:`zooprune.pipeline`, never
an engine: the Hugging Face adapters (:mod:`zooprune.adapters`) and the vLLM variants
(:mod:`zooprune.integrations.vllm`) both call it, and neither imports the other.
"""
