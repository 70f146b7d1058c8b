"""The applications: the `fundus2video` CLI and the demo. Only they may import `ui`."""
