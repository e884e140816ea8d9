"""scgw simulators package."""
