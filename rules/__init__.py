"""scgw rules package."""
