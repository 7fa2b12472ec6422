"""Model bundles: adapters that give the trainer one interface over different model hosts."""
