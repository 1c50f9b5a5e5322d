"""Small shared infrastructure: user-facing errors and atomic, manifested artifacts."""
