"""Teacher loaders (open_clip, speech recognisers, BEV detectors).

Modules here register themselves into core registries; `xmodal.plugins.load_plugins()` imports them all.
"""
