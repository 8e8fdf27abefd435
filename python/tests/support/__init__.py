"""Test harness pieces: test PKI (openssl), HTTPS echo origin, the real daemon, host state."""
