"""Methods that are not a trunk trained by gradient steps (closed form, neighbours)."""
