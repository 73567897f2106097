"""Task heads and evaluators (retrieval, zero-shot, lip reading, detection).

Modules here register themselves into core registries; `xmodal.plugins.load_plugins()` imports them all.
"""
