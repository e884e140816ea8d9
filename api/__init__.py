"""scgw api package."""
