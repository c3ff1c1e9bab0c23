"""Downstream tools that read an output through the catalog: k-NN search and the linear probe.
The job never imports them."""
