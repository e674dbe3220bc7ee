"""optim_zoo's three benchmark programs: the main job, the claims, the speed (see README.md)."""
