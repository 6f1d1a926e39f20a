"""Many workers behind one endpoint: the router and the worker's registration with it."""
