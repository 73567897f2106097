"""Core subcommands; every module here registers itself with `xmodal.cli.register_command`."""
