"""Synthetic vision-language testbed for measuring visual-token pruning.

Submodules are imported explicitly (e.g. ``from zooprune.testbed import scenes``)
so that importing this package stays cheap and never pulls in torch.
"""
