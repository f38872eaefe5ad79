"""Command-line entry points that train and evaluate HemaScribe models (uses `core`)."""
