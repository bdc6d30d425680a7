"""Local infrastructure for the embedded stack: installers and launchers for external servers."""
