"""Deployment: the `tandem` CLI and the launchers that start node servers (local processes now,
Ray actors next). The node servers do not know how they were started."""
