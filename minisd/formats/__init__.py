"""Weight files: safe reading, strict loading, diffusers folders and the original single-file layout."""
