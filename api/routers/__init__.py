"""API routers, one module per audience or resource."""
