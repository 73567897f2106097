"""Student architectures (small CLIPs, lip readers, BEV students).

Modules here register themselves into core registries; `xmodal.plugins.load_plugins()` imports them all.
"""
