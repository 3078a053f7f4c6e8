"""The web dashboard served on the web port."""
