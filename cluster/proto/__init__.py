"""Generated client API messages and stubs; regenerate with gen.sh."""
