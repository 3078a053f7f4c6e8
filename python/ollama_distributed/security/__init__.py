"""Who may talk to the node: browser origins and Host names (CSRF and DNS
rebinding), API keys with roles and per-key limits, and the redaction of
secrets from what the node prints. Pure policy and state; the aiohttp glue is
api/guard.py, the local admin socket api/admin.py."""
