"""Speed kernels: faster formulations of the papers' computations, each the same function as the plain one (tested)."""
