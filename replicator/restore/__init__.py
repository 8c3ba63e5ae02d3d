"""Point-in-time restore: the point, the planner (pure), replay, digest and the executor."""
