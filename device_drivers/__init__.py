"""scgw device_drivers package."""
