"""The `tierwise` command: above the core package and both components, which never import it."""
