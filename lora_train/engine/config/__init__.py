"""The training config: keys, help, checks, YAML in and out, and the network the keys ask for."""
