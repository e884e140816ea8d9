"""canteen."""
