"""scgw gateway package."""
