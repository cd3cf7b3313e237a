"""Generated client API messages and stubs; regenerate with scripts/gen_protos.sh."""
