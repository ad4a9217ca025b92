"""Speed kernels: faster layouts of the papers' computations, each the same function as the official one."""
